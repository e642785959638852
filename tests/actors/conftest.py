"""Fixtures of the Ray tests of ``actors/``: a student checkpoint and Serve apps torn down after use."""

from __future__ import annotations

import pytest

from gold_ray.run.tasks import load_task


@pytest.fixture(scope="session")
def sst2():
    """The shipped SST-2 task."""
    return load_task("sst2")


@pytest.fixture(scope="session")
def student_ckpt(tmp_path_factory, sst2, tiny_student):
    """A saved classifier student (the tiny random BERT) for SST-2, as ``load_student`` reads it."""
    from gold_ray.student.model import ClassifierStudent

    ckpt = tmp_path_factory.mktemp("student-ckpt")
    ClassifierStudent(sst2, tiny_student, device="cpu").save(ckpt)
    return str(ckpt)


@pytest.fixture(scope="session")
def serve_port(ray_cluster):
    """Starts Serve once the way a run does (``start_http``, default host), on a free port (never 8000)."""
    from actors.teacher import start_http
    from tests.raykit import free_port, make_cfg

    port = free_port()
    start_http(make_cfg(teacher={"serve": {"port": port}}))
    return port


@pytest.fixture
def serve_apps(serve_port):
    """Deploys teacher apps for one test (``deploy(app, name)``) and deletes them afterwards."""
    from ray import serve

    names: list[str] = []

    def deploy(app, name: str, route_prefix: str | None = None):
        names.append(name)
        return serve.run(app, name=name, route_prefix=route_prefix, blocking=False)

    yield deploy
    for name in names:
        serve.delete(name)
