"""``make test``'s runner (``tests/split_run.py``): the Ray tests and the others in two pytest processes."""

from __future__ import annotations

import os

from tests import split_run

SUITE = '''
import os
import pytest

def _where(name):
    with open(os.path.join(os.path.dirname(__file__), name), "w") as f:
        f.write(str(os.getpid()))

@pytest.mark.ray
def test_on_ray():
    _where("ray.pid")

@pytest.mark.ray
@pytest.mark.own_ray
def test_on_a_ray_of_its_own():
    _where("own.pid")

def test_elsewhere():
    _where("other.pid")
    assert os.environ.get("FAIL_OTHERS") != "1"
'''
INI = "[pytest]\nmarkers =\n    ray: starts Ray\n    own_ray: starts a Ray of its own\n"


def _suite(tmp_path):
    root = tmp_path / "suite"
    root.mkdir()
    (root / "pytest.ini").write_text(INI)
    (root / "test_parts.py").write_text(SUITE)
    return root


def test_ray_tests_and_the_others_run_in_two_processes_and_both_logs_are_kept(tmp_path, monkeypatch, capsys):
    """The session's Ray tests in one process; the rest, those with a Ray of their own too, in the other."""
    root = _suite(tmp_path)
    monkeypatch.delenv("FAIL_OTHERS", raising=False)
    assert split_run.main([str(root), "-p", "no:cacheprovider", "-q"], log_dir=tmp_path / "logs") == 0
    ray_pid, other_pid = (root / "ray.pid").read_text(), (root / "other.pid").read_text()
    assert ray_pid != other_pid and str(os.getpid()) not in (ray_pid, other_pid)
    assert (root / "own.pid").read_text() == other_pid
    out = capsys.readouterr().out
    for marker in split_run.PARTS.values():
        assert f"tests marked {marker!r}: pytest exited" in out
    assert "1 passed" in (tmp_path / "logs" / "ray.log").read_text()
    assert "2 passed" in (tmp_path / "logs" / "others.log").read_text()


def test_a_failing_part_fails_the_run_and_a_part_with_no_test_does_not(tmp_path, monkeypatch):
    root = _suite(tmp_path)
    monkeypatch.setenv("FAIL_OTHERS", "1")
    assert split_run.main([str(root), "-p", "no:cacheprovider", "-q"], log_dir=tmp_path / "logs") == 1
    assert "1 failed" in (tmp_path / "logs" / "others.log").read_text()
    # Only the Ray part selects a test here: the other part's exit 5 (no test) is a pass.
    monkeypatch.delenv("FAIL_OTHERS")
    selected = f"{root}/test_parts.py::test_on_ray"
    assert split_run.main([selected, "-p", "no:cacheprovider", "-q"], log_dir=tmp_path / "logs") == 0
    assert "no tests ran" in (tmp_path / "logs" / "others.log").read_text() or \
        "deselected" in (tmp_path / "logs" / "others.log").read_text()


def test_a_marker_selection_of_ones_own_runs_one_plain_pytest(tmp_path, monkeypatch):
    root = _suite(tmp_path)
    monkeypatch.delenv("FAIL_OTHERS", raising=False)
    assert split_run.main([str(root), "-p", "no:cacheprovider", "-q", "-m", "not ray"],
                          log_dir=tmp_path / "logs") == 0
    assert (root / "other.pid").exists() and not (root / "ray.pid").exists()
    assert not (tmp_path / "logs").exists()


def test_modules_named_to_run_last_do_so_and_the_rest_keep_their_order():
    from types import SimpleNamespace

    from tests import conftest

    last = f"{conftest.RUN_LAST[0]}::t"
    items = [SimpleNamespace(nodeid=n) for n in ("tests/b.py::t2", last, "tests/a.py::t1")]
    conftest.pytest_collection_modifyitems(items)
    assert [i.nodeid for i in items] == ["tests/b.py::t2", "tests/a.py::t1", last]
