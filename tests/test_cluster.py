"""The cluster recipes under cluster/: they parse, agree with each other and point at real code.

No Kubernetes and no Ray cluster here: these checks catch the drift that would only show on a
real cluster (an image renamed in one manifest, an entrypoint module that moved, a config path
that no longer exists or no longer validates, GPU limits that disagree with Ray's GPU count).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gold_ray.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
RAY_UP = CLUSTER / "ray-up" / "aws-gpu.yaml"
DOCKERFILE = CLUSTER / "docker" / "Dockerfile.gpu"


def yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in {".yaml", ".yml"})


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def manifests(kind: str) -> list[dict[str, Any]]:
    found = [d for p in KUBERAY.glob("*.yaml") for d in docs(p) if d.get("kind") == kind]
    assert found, f"no {kind} manifest under {KUBERAY}"
    return found


def cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every RayCluster spec, standalone or embedded in a RayJob / RayService."""
    specs = [(f"RayCluster {m['metadata']['name']}", m["spec"]) for m in manifests("RayCluster")]
    specs += [(f"RayJob {m['metadata']['name']}", m["spec"]["rayClusterSpec"]) for m in manifests("RayJob")]
    specs += [(f"RayService {m['metadata']['name']}", m["spec"]["rayClusterConfig"]) for m in manifests("RayService")]
    return specs


def walk_strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from walk_strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk_strings(value)


def containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    for group in groups:
        yield from group["template"]["spec"]["containers"]


def commands() -> list[str]:
    """Every shell command in the manifests and the ray-up config that could start gold-ray."""
    found: list[str] = []
    for path in [*KUBERAY.glob("*.yaml"), RAY_UP]:
        for d in docs(path):
            found += [s for s in walk_strings(d) if "python" in s and " -m " in s]
    return found


def serve_configs() -> list[dict[str, Any]]:
    return [yaml.safe_load(m["spec"]["serveConfigV2"]) for m in manifests("RayService")]


def resolve_config(ref: str) -> Path:
    # Manifests name configs relative to the project (the image sets GOLD_RAY_HOME to its copy).
    path = Path(ref)
    return path if path.is_absolute() else ROOT / path


def gpu_config() -> RunConfig:
    return load_config(CLUSTER / "configs" / "gpu.yaml")


def peak_gpus(cfg: RunConfig) -> float:
    """GPUs a run holds at once: teacher replicas at their ceiling, the scorer pool, the trainers."""
    teacher = cfg.teacher.serve.max_replicas * cfg.teacher.serve.num_gpus
    scorers = math.ceil(cfg.resources.scorer_max_actors * cfg.resources.scorer_num_gpus)
    trainers = cfg.resources.train_workers if cfg.resources.train_use_gpu else 0
    return teacher + scorers + trainers


def gpu_group(spec: dict[str, Any]) -> dict[str, Any]:
    groups = [g for g in spec["workerGroupSpecs"] if "num-gpus" in g.get("rayStartParams", {})]
    assert len(groups) == 1, "expected exactly one GPU worker group"
    return groups[0]


# ---- parsing ---------------------------------------------------------------------------------


def test_every_yaml_under_cluster_parses():
    files = yaml_files()
    assert {p.name for p in files} >= {"raycluster.yaml", "rayjob.yaml", "rayservice.yaml", "aws-gpu.yaml", "gpu.yaml"}
    for path in files:
        assert docs(path), f"{path} holds no YAML document"


def test_kuberay_manifests_use_the_ray_io_v1_api():
    for path in KUBERAY.glob("*.yaml"):
        for d in docs(path):
            if d["kind"] in {"RayCluster", "RayJob", "RayService"}:
                assert d["apiVersion"] == "ray.io/v1", path


def test_serve_config_v2_is_yaml_with_applications():
    for config in serve_configs():
        assert config["applications"], "serveConfigV2 has no application"


# ---- cluster shape ---------------------------------------------------------------------------


def test_autoscaler_v2_is_on_everywhere():
    for name, spec in cluster_specs():
        assert spec.get("enableInTreeAutoscaling") is True, name
        assert spec.get("autoscalerOptions", {}).get("version") == "v2", name


def test_head_runs_no_work():
    for name, spec in cluster_specs():
        assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", name


def test_gpu_limits_match_ray_gpu_count():
    for name, spec in cluster_specs():
        group = gpu_group(spec)
        ray_gpus = int(group["rayStartParams"]["num-gpus"])
        assert ray_gpus >= 1, name
        (worker,) = group["template"]["spec"]["containers"]
        limits = worker["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == ray_gpus, f"{name}: nvidia.com/gpu limit != num-gpus"
        assert group["minReplicas"] <= group["maxReplicas"], name


def test_ray_version_matches_the_image_base_and_the_installed_ray():
    base = re.search(r"^FROM rayproject/ray:(\S+)", DOCKERFILE.read_text(encoding="utf-8"), re.M)
    assert base, "Dockerfile.gpu must build on a rayproject/ray image"
    version = base.group(1).split("-")[0]
    assert version.startswith("2.60."), version
    for name, spec in cluster_specs():
        assert spec["rayVersion"] == version, name


def test_every_manifest_names_the_same_image():
    images = {c["image"] for _, spec in cluster_specs() for c in containers(spec)}
    images.add(yaml.safe_load(RAY_UP.read_text(encoding="utf-8"))["docker"]["image"])
    tags = set(re.findall(r"docker build .*-t (\S+)", DOCKERFILE.read_text(encoding="utf-8")))
    assert len(images) == 1, f"manifests disagree on the image: {sorted(images)}"
    assert tags == images, f"Dockerfile.gpu builds {tags}, manifests run {images}"


def test_the_gpu_fleet_fits_the_gpu_config():
    need = peak_gpus(gpu_config())
    for name, spec in cluster_specs():
        if name.startswith("RayService"):
            continue  # the service hosts the teacher alone; checked below
        group = gpu_group(spec)
        have = group["maxReplicas"] * int(group["rayStartParams"]["num-gpus"])
        assert have >= need, f"{name}: {have} GPUs at most, the config needs {need}"
    up = yaml.safe_load(RAY_UP.read_text(encoding="utf-8"))
    gpu_types = [t for t in up["available_node_types"].values() if t.get("resources", {}).get("GPU")]
    assert sum(t["max_workers"] * t["resources"]["GPU"] for t in gpu_types) >= need


def test_rayservice_fleet_fits_its_teacher_replicas():
    (service,) = manifests("RayService")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    cfg = load_config(resolve_config(app["args"]["config"]), list(app["args"].get("set", [])))
    group = gpu_group(service["spec"]["rayClusterConfig"])
    have = group["maxReplicas"] * int(group["rayStartParams"]["num-gpus"])
    assert have >= cfg.teacher.serve.max_replicas * cfg.teacher.serve.num_gpus


# ---- entrypoints and configs -----------------------------------------------------------------


def test_every_python_module_entrypoint_exists():
    modules = set()
    for command in commands():
        words = shlex.split(command)
        modules |= {words[i + 1] for i, w in enumerate(words[:-1]) if w == "-m" and "python" in words[i - 1]}
    assert "jobs.distill" in modules
    for module in modules:
        rel = Path(*module.split("."))
        assert (ROOT / rel.with_suffix(".py")).is_file() or (ROOT / rel / "__init__.py").is_file(), module


def test_every_config_path_exists_and_validates():
    refs = set()
    for command in commands():
        words = shlex.split(command)
        refs |= {words[i + 1] for i, w in enumerate(words[:-1]) if w == "--config"}
    for config in serve_configs():
        refs |= {app["args"]["config"] for app in config["applications"] if "config" in app.get("args", {})}
    assert refs, "no --config in the manifests"
    for ref in refs:
        path = resolve_config(ref)
        assert path.is_file(), ref
        assert isinstance(load_config(path), RunConfig)


def test_rayjob_runs_once_and_cleans_up_and_reaches_mlflow():
    for job in manifests("RayJob"):
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] >= 0
        assert spec["entrypoint"].split()[:3] == ["python", "-m", "jobs.distill"]
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")


def test_gpu_config_is_a_gpu_run():
    cfg = gpu_config()
    assert cfg.teacher.engine == "vllm"
    assert cfg.teacher.serve.num_gpus >= 1
    assert cfg.teacher.serve.min_replicas <= cfg.teacher.serve.max_replicas
    assert cfg.resources.scorer_num_gpus > 0
    assert cfg.resources.train_use_gpu is True
    # A real hub model, not an embedded CPU default.
    assert not cfg.teacher.model.startswith("embedded:") and "/" in cfg.teacher.model
    # On the shared volume, so a resubmitted job finds its committed state.
    assert Path(cfg.output.dir).is_absolute()


def test_serve_import_path_resolves_to_a_one_argument_builder():
    for config in serve_configs():
        for app in config["applications"]:
            module_name, _, attr = app["import_path"].partition(":")
            module = importlib.import_module(module_name)
            builder = getattr(module, attr)
            assert inspect.isfunction(builder)
            # Serve calls an application builder with exactly one argument: the args dict.
            assert len(inspect.signature(builder).parameters) == 1


def test_serve_builder_builds_the_teacher_from_the_config(monkeypatch):
    from jobs.serve_app import app_from_args

    monkeypatch.setenv("GOLD_RAY_HOME", str(ROOT))
    monkeypatch.chdir(ROOT / "cluster")  # the config must resolve through GOLD_RAY_HOME, not the cwd
    app = app_from_args({"config": "cluster/configs/gpu.yaml", "set": ["teacher.serve.max_replicas=3"]})
    deployment = app._bound_deployment  # Serve has no public accessor for a bound app's options
    assert deployment.ray_actor_options["num_gpus"] == gpu_config().teacher.serve.num_gpus
    assert deployment._deployment_config.autoscaling_config.max_replicas == 3


def test_serve_builder_names_a_bad_key():
    from gold_ray.config import ConfigError
    from jobs.serve_app import app_from_args

    with pytest.raises(ConfigError, match=r"teacher\.serve\.max_replicaz"):
        app_from_args({"config": str(CLUSTER / "configs" / "gpu.yaml"), "set": ["teacher.serve.max_replicaz=3"]})


# ---- images and cloud config -----------------------------------------------------------------


def test_dockerfile_installs_the_gpu_extra_and_the_project_home():
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"pip install[^\n]*\"?\.\[gpu\]\"?", text), "Dockerfile.gpu must pip install .[gpu]"
    home = re.search(r"GOLD_RAY_HOME=(\S+)", text)
    workdir = re.search(r"^WORKDIR (\S+)", text, re.M)
    assert home and workdir and home.group(1) == workdir.group(1), "GOLD_RAY_HOME must be the copied project"


def test_ray_up_config_validates_against_rays_schema():
    import jsonschema  # installed with ray

    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.submodule_search_locations
    schema_path = Path(spec.submodule_search_locations[0]) / "autoscaler" / "ray-schema.json"
    config = yaml.safe_load(RAY_UP.read_text(encoding="utf-8"))
    jsonschema.validate(config, json.loads(schema_path.read_text(encoding="utf-8")))
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert any("gold-ray[gpu]" in c for c in config["setup_commands"])
