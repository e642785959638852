"""A run that starts from another run's first teacher pass (``output.fork_from``)."""

import pytest

from gold_ray.entry import load_run_config
from gold_ray.run.fork import ForkError
from gold_ray.run.loop import STAGES, Distiller
from gold_ray.run.store import FIRST_PASS_FILE, PENDING_PROBES, part_path, read_parts
from gold_ray.testing import FakeTeacherEngine, RecordingEngine, tiny_run_config
from tests.faults.faultkit import write_eval_file


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    return write_eval_file(tmp_path_factory.mktemp("fork-eval") / "eval.jsonl", n=12,
                           text="a sample {i} that reads as {label}")


def make_cfg(run_dir, tiny_student, eval_file, *extra):
    return tiny_run_config(run_dir, tiny_student, f"task.eval_path={eval_file}", "budget.samples=24",
                           "strategy.probe_fraction=0.5", *extra)


def texts(run_dir, kind, iteration):
    return [(r["id"], r["text"], r["label"]) for r in read_parts([part_path(run_dir, kind, iteration)])]


def first_pass_prompts(engine):
    return [p for p in engine.prompts if p.meta.get("uid", "").startswith("it0-")]


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_student, eval_file):
    """A finished GOLD run (its pending probes long removed) and its metrics."""
    run = tmp_path_factory.mktemp("fork-source") / "run"
    metrics = Distiller(make_cfg(run, tiny_student, eval_file), engine=FakeTeacherEngine()).run()
    return run, metrics


def test_a_fork_with_the_same_config_repeats_its_source_without_its_first_pass(
        tmp_path, tiny_student, eval_file, source):
    src, ref = source
    assert (src / FIRST_PASS_FILE).is_file() and not part_path(src, PENDING_PROBES, 0).exists()
    engine = RecordingEngine()
    fork = tmp_path / "fork"
    metrics = Distiller(make_cfg(fork, tiny_student, eval_file, f"output.fork_from={src}"), engine=engine).run()

    assert not first_pass_prompts(engine), "the first teacher pass is copied, not asked for again"
    assert any(p.meta.get("uid", "").startswith("it1-") for p in engine.prompts)
    assert metrics["forked_from"] == str(src.resolve()) and ref["forked_from"] is None
    assert texts(fork, "train", 0) == texts(src, "train", 0) and texts(fork, "probe", 0) == texts(src, "probe", 0)
    # The copied probes were scored again by the fork's own student: the same one, so the same band.
    assert [m["feedback"]["ids"] for m in metrics["iterations"]] == [m["feedback"]["ids"] for m in ref["iterations"]]
    assert [m["train"]["loss"] for m in metrics["iterations"]] == [m["train"]["loss"] for m in ref["iterations"]]
    assert metrics["totals"] == ref["totals"] and metrics["teacher_tokens"] == ref["teacher_tokens"]


def test_a_random_band_fork_shares_the_first_pass_and_then_goes_its_own_way(tmp_path, tiny_student, eval_file, source):
    src, _ = source
    fork = tmp_path / "fork"
    metrics = Distiller(make_cfg(fork, tiny_student, eval_file, f"output.fork_from={src}", "strategy.score=random"),
                        engine=FakeTeacherEngine()).run()
    assert texts(fork, "train", 0) == texts(src, "train", 0)
    from gold_ray.student.ood import hashed_uniform_scores

    probes = [r for r in read_parts([part_path(fork, "probe", 0)]) if not r["reject_reason"]]
    assert [r["score"] for r in probes] == list(hashed_uniform_scores([{"text": r["text"]} for r in probes]))
    assert metrics["final"]["n"] == 12


def test_a_fork_of_a_run_stopped_after_its_first_pass_uses_its_pending_probes(tmp_path, tiny_student, eval_file,
                                                                              source):
    _, ref = source

    class Stop(Exception):
        pass

    def stop_after_the_first_pass(stage, info):
        if stage in STAGES and (info["iteration"], stage) == (0, "generate"):
            raise Stop

    src = tmp_path / "stopped"
    with pytest.raises(Stop):
        Distiller(make_cfg(src, tiny_student, eval_file), engine=FakeTeacherEngine(),
                  on_event=stop_after_the_first_pass).run()
    assert part_path(src, PENDING_PROBES, 0).is_file()
    metrics = Distiller(make_cfg(tmp_path / "fork", tiny_student, eval_file, f"output.fork_from={src}"),
                        engine=FakeTeacherEngine()).run()
    assert [m["feedback"]["ids"] for m in metrics["iterations"]] == [m["feedback"]["ids"] for m in ref["iterations"]]


@pytest.mark.parametrize(("extra", "named"), [
    (("seed=1",), "seed: 0 there, 1 here"),
    (("strategy.iterations=3",), "strategy.iterations"),
    (("teacher.temperature=0.5",), "teacher.temperature"),
])
def test_a_fork_refuses_a_run_that_differs_before_its_first_pass(tmp_path, tiny_student, eval_file, source, extra,
                                                                 named):
    src, _ = source
    fork = tmp_path / "fork"
    with pytest.raises(ForkError, match=named.replace(".", r"\.")):
        Distiller(make_cfg(fork, tiny_student, eval_file, f"output.fork_from={src}", *extra),
                  engine=FakeTeacherEngine())
    assert not (fork / "state.json").exists() and not (fork / "config.yaml").exists()


def test_a_fork_needs_a_run_with_its_first_pass_committed(tmp_path, tiny_student, eval_file, source):
    src, _ = source
    with pytest.raises(ForkError, match="no such run directory"):
        Distiller(make_cfg(tmp_path / "fork", tiny_student, eval_file, f"output.fork_from={tmp_path / 'none'}"),
                  engine=FakeTeacherEngine())
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.yaml").write_bytes((src / "config.yaml").read_bytes())
    with pytest.raises(ForkError, match=FIRST_PASS_FILE):
        Distiller(make_cfg(tmp_path / "fork", tiny_student, eval_file, f"output.fork_from={bare}"),
                  engine=FakeTeacherEngine())


def test_the_command_line_fork_is_kept_as_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_run_config(None, [], fork_from="runs/gold")
    assert cfg.output.fork_from == str(tmp_path / "runs" / "gold")
