"""Security defaults: loopback-only servers, no model code and no pickles from user folders.

Planted files prove the negative: a model folder whose custom code, or whose pickled weights,
would write a marker file when run or unpickled. Loading such a folder must fail with a clear
error and leave no marker.
"""

from __future__ import annotations

import ast
import json
import logging
import pickle
import shutil
from pathlib import Path

import pytest

from gold_ray import models
from gold_ray.cli import main
from gold_ray.config import RunConfig, StudentConfig, load_config
from gold_ray.models import ModelResolutionError, resolve_model
from gold_ray.run.tasks import load_task
from gold_ray.student.model import ClassifierStudent, check_student_model
from gold_ray.teacher.hf_engine import HFEngine

SST2 = load_task("sst2")
REPO_ROOT = Path(__file__).resolve().parents[2]


# --- servers listen on loopback unless configured ---------------------------------------------


def test_the_dashboard_binds_to_loopback_by_default(monkeypatch):
    # Serve's proxy is checked on its real sockets (tests/actors/test_cli_serve.py); a second Ray
    # cannot start inside the test session, so the driver's ray.init arguments are checked here.
    import ray

    import actors.driver as driver

    cfg = RunConfig()
    assert cfg.teacher.serve.host == "127.0.0.1"
    inits = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: inits.append(kw))
    driver.ensure_ray(cfg)
    [kw] = inits
    assert kw["include_dashboard"] is False and kw["dashboard_host"] == "127.0.0.1"


def test_serve_binds_elsewhere_only_when_configured(monkeypatch):
    from ray import serve

    import actors.teacher as teacher

    started = {}
    monkeypatch.setattr(serve, "start", lambda **kw: started.update(kw))
    monkeypatch.setattr(serve, "run", lambda app, **kw: None)
    teacher.start_teacher(load_config(None, ["teacher.serve.host=0.0.0.0", "teacher.serve.port=8123"]))
    assert started["http_options"] == {"host": "0.0.0.0", "port": 8123}


def test_a_distillation_on_ray_opens_no_http_port(monkeypatch):
    from types import SimpleNamespace

    from ray import serve

    import actors.teacher as teacher
    from actors.runtime import RayRuntime

    started: list[dict] = []
    monkeypatch.setattr(serve, "start", lambda **kw: started.append(kw))
    monkeypatch.setattr(serve, "run", lambda app, **kw: None)
    cfg = load_config(None, ["teacher.serve.host=0.0.0.0"])
    teacher.start_teacher(cfg, http=False)
    assert started == [{"proxy_location": "Disabled"}]  # not even the configured host is bound

    # The Ray runtime starts its teacher that way (its training workers and caller are not the point here).
    started.clear()
    runtime = RayRuntime("app")
    runtime.bind(SimpleNamespace(cfg=cfg, teacher_path=None))
    monkeypatch.setattr(runtime, "_train_step", lambda: SimpleNamespace(start=lambda: None))
    monkeypatch.setattr(runtime, "_teacher_caller", lambda: None)
    runtime.start()
    assert started == [{"proxy_location": "Disabled"}]


# --- model code runs only when the config says so --------------------------------------------

EVIL_CODE = """
from pathlib import Path
Path({marker!r}).write_text("model code ran")
from transformers import BertConfig, BertForSequenceClassification, BertLMHeadModel

class EvilConfig(BertConfig):
    model_type = "gold_ray_evil"

class EvilModel(BertForSequenceClassification):
    config_class = EvilConfig
"""


def _copy_tokenizer(src: str, dst: Path) -> None:
    for f in Path(src).iterdir():
        if "token" in f.name or f.name.startswith("vocab"):
            shutil.copy(f, dst / f.name)


@pytest.fixture
def planted_code(tmp_path, tiny_student) -> tuple[Path, Path]:
    """A model folder whose config asks for its own code (which would write a marker)."""
    folder, marker = tmp_path / "custom-model", tmp_path / "code-ran"
    shutil.copytree(tiny_student, folder)
    config = json.loads((folder / "config.json").read_text())
    auto = "evil.EvilModel"
    config.update(model_type="gold_ray_evil", auto_map={"AutoConfig": "evil.EvilConfig",
                  "AutoModelForSequenceClassification": auto, "AutoModelForCausalLM": auto})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    return folder, marker


def test_trust_remote_code_is_off_and_planted_model_code_never_runs(planted_code, tmp_path, capsys,
                                                                   eval_file):
    folder, marker = planted_code
    cfg = RunConfig()
    assert cfg.teacher.trust_remote_code is False and cfg.student.trust_remote_code is False
    assert resolve_model(str(folder)) == str(folder.resolve())  # a well-formed folder otherwise

    with pytest.raises(ValueError, match="trust_remote_code"):
        check_student_model(SST2, StudentConfig(model=str(folder)), folder)
    with pytest.raises(ValueError, match=r"student\.model .*trust_remote_code"):
        ClassifierStudent(SST2, folder, device="cpu")
    with pytest.raises(ValueError, match="trust_remote_code"):
        HFEngine(str(folder), device="cpu")
    code = main(["distill", "tiny", "--local", "--quiet", "--output", str(tmp_path / "run"),
                 "--set", f"student.model={folder}", "--set", f"task.eval_path={eval_file}",
                 "--set", "teacher.engine=openai", "--set", "teacher.base_url=http://127.0.0.1:9/v1"])
    assert code == 2 and "trust_remote_code" in capsys.readouterr().err
    assert not marker.exists(), "model code ran without trust_remote_code"


def _ours(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gold_ray.models"]


def test_trust_remote_code_on_warns_naming_the_model(tiny_student, caplog, monkeypatch):
    monkeypatch.setattr(models, "_REMOTE_CODE_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="gold_ray.models"):
        ClassifierStudent(SST2, tiny_student, device="cpu")
        assert not _ours(caplog)
        ClassifierStudent(SST2, tiny_student, device="cpu", trust_remote_code=True)
        ClassifierStudent(SST2, tiny_student, device="cpu", trust_remote_code=True)
    [warning] = _ours(caplog)  # once per model, not once per load
    assert "student.trust_remote_code is on" in warning and tiny_student in warning

    caplog.clear()
    monkeypatch.setattr(models, "_REMOTE_CODE_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="gold_ray.models"):
        check_student_model(SST2, StudentConfig(model=tiny_student, trust_remote_code=True), tiny_student)
        HFEngine(tiny_student, device="cpu", trust_remote_code=True)
    messages = _ours(caplog)
    assert any(m.startswith("student.trust_remote_code is on") and tiny_student in m for m in messages)
    assert any(m.startswith("teacher.trust_remote_code is on") and tiny_student in m for m in messages)


# --- no pickle from user files -----------------------------------------------------------------


class _Plant:
    """Unpickling this writes a file: what a hostile ``pytorch_model.bin`` could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


@pytest.fixture
def pickled_model(tmp_path, tiny_student) -> tuple[Path, Path]:
    """A model folder with a config, a tokenizer and only a pickled (hostile) weights file."""
    folder, marker = tmp_path / "pickled-model", tmp_path / "unpickled"
    folder.mkdir()
    shutil.copy(Path(tiny_student) / "config.json", folder / "config.json")
    _copy_tokenizer(tiny_student, folder)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Plant(marker), protocol=4))
    return folder, marker


def test_pickled_weights_are_refused_and_never_unpickled(pickled_model, tmp_path, capsys, eval_file):
    folder, marker = pickled_model
    with pytest.raises(ModelResolutionError, match=r"no safetensors weights there, only pickle weights "
                                                   r"\(pytorch_model\.bin\), which gold-ray never loads"):
        resolve_model(str(folder))
    # The loaders refuse the folder even when handed it directly.
    with pytest.raises(ValueError, match=r"student\.model"):
        ClassifierStudent(SST2, folder, device="cpu")
    with pytest.raises(OSError, match="safetensors"):
        HFEngine(str(folder), device="cpu")
    code = main(["distill", "tiny", "--local", "--quiet", "--output", str(tmp_path / "run"),
                 "--set", f"student.model={folder}", "--set", f"task.eval_path={eval_file}",
                 "--set", "teacher.engine=openai", "--set", "teacher.base_url=http://127.0.0.1:9/v1"])
    assert code == 2 and "pytorch_model.bin" in capsys.readouterr().err
    assert not marker.exists(), "a pickle from a user folder was loaded"
    assert not (tmp_path / "run").exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value if isinstance(func, ast.Attribute) else None
            owner_name = getattr(owner, "id", getattr(owner, "attr", "")) if owner is not None else ""
            kwargs = {k.arg: k.value for k in node.keywords}
            yield name, owner_name, kwargs, node


def _true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_the_code_has_no_pickle_loader_for_user_files():
    problems = []
    for path in sorted([*REPO_ROOT.glob("gold_ray/**/*.py"), *REPO_ROOT.glob("actors/*.py"),
                        *REPO_ROOT.glob("jobs/*.py")]):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        where = path.relative_to(REPO_ROOT)
        for node in ast.walk(tree):
            names = [a.name for a in getattr(node, "names", [])] if isinstance(node, ast.Import | ast.ImportFrom) else []
            module = getattr(node, "module", None) or ""
            for name in [*names, module]:
                if name.split(".")[0] in {"pickle", "dill", "joblib", "cloudpickle"}:
                    problems.append(f"{where}:{node.lineno}: imports {name}")
        for name, owner, kwargs, node in _calls(tree):
            line = f"{where}:{node.lineno}"
            if name == "load" and owner == "torch" and not _true(kwargs.get("weights_only")):
                problems.append(f"{line}: torch.load without weights_only=True")
            if name == "load" and owner == "np" and _true(kwargs.get("allow_pickle")):
                problems.append(f"{line}: np.load with allow_pickle=True")
            if name == "read_pickle":
                problems.append(f"{line}: read_pickle")
            is_model = "Model" in owner or owner == "auto"
            if name == "from_pretrained" and is_model and "gguf_file" not in kwargs \
                    and not _true(kwargs.get("use_safetensors")):
                problems.append(f"{line}: {owner}.from_pretrained without use_safetensors=True")
    assert problems == []
