"""A run that starts from another run's first teacher pass (``output.fork_from``)."""

import json
import zlib

import pytest

from gold_ray.entry import load_run_config
from gold_ray.run.fork import FREE_KEYS, ForkError, config_differences
from gold_ray.run.loop import STAGES, Distiller
from gold_ray.run.store import FIRST_PASS_FILE, PENDING_PROBES, part_path, read_parts
from gold_ray.testing import RecordingEngine, tiny_run_config
from gold_ray.types import Generation
from tests.faults.faultkit import write_eval_file

# What a fork's final state shares with its source's when it changes nothing (timings aside).
SHARED_STATE = ("iteration", "stage", "finished", "feedback", "dedup", "parts", "teacher_tokens",
                "teacher_prompt_tokens", "label_agreement", "strategy_state")


class _UnevenTeacher(RecordingEngine):
    """The fake teacher with some of everything a first pass keeps: failed calls, near-duplicates
    and samples it reads back as another label, each chosen by the prompt's uid (so a fork and
    its source get the same answers to the same prompts, whatever else they ask)."""

    @staticmethod
    def _pick(key, salt):
        return zlib.crc32(f"{key}|{salt}".encode()) % 4 == 0

    def generate(self, prompts, params):
        out = super().generate(prompts, params)
        for i, prompt in enumerate(prompts):
            if self._pick(prompt.meta.get("uid"), "error"):
                out[i] = Generation(text="", error="fake engine: injected failure")
            elif self._pick(prompt.meta.get("uid"), "same"):
                out[i] = Generation(text=f"the same sample that reads as {prompt.label} in tone.", output_tokens=9)
        return out

    def option_logprobs(self, prompts, options):
        rows = super().option_logprobs(prompts, options)
        # Read back by the sample's text (the label check's prompts carry no uid).
        return [row[1:] + row[:1] if self._pick(p.messages[-1]["content"], "read") else row
                for p, row in zip(prompts, rows, strict=True)]


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    return write_eval_file(tmp_path_factory.mktemp("fork-eval") / "eval.jsonl", n=12,
                           text="a sample {i} that reads as {label}")


def make_cfg(run_dir, tiny_student, eval_file, *extra):
    return tiny_run_config(run_dir, tiny_student, f"task.eval_path={eval_file}", "budget.samples=48",
                           "strategy.probe_fraction=0.5", "teacher.check_labels=true",
                           "baselines.teacher_fewshot=false", *extra)


def rows(run_dir, kind, iteration):
    return [(r["id"], r["text"], r["label"], r["reject_reason"])
            for r in read_parts([part_path(run_dir, kind, iteration)])]


def asked_in_iteration(engine, iteration):
    return [p for p in engine.prompts if p.meta.get("uid", "").startswith(f"it{iteration}-")]


class Stop(Exception):
    pass


def stop_after(iteration):
    """An ``on_event`` that stops the run once the generate stage of ``iteration`` has committed."""
    def on_event(stage, info):
        if stage in STAGES and (info["iteration"], stage) == (iteration, "generate"):
            raise Stop
    return on_event


def fork_run(run_dir, tiny_student, eval_file, source, *extra):
    engine = _UnevenTeacher()
    metrics = Distiller(make_cfg(run_dir, tiny_student, eval_file, f"output.fork_from={source}", *extra),
                        engine=engine).run()
    return metrics, engine


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_student, eval_file):
    """A finished GOLD run (its pending probes long removed) and its metrics."""
    run = tmp_path_factory.mktemp("fork-source") / "run"
    metrics = Distiller(make_cfg(run, tiny_student, eval_file), engine=_UnevenTeacher()).run()
    return run, metrics


def test_the_source_has_all_a_first_pass_keeps(source):
    src, ref = source
    gen, probe = ref["iterations"][0]["generate"], ref["iterations"][0]["probe"]
    for stats in (gen, probe):
        assert {"error", "duplicate", "label_check"} <= set(stats["rejected_by_reason"]), stats["rejected_by_reason"]
    assert (src / FIRST_PASS_FILE).is_file() and not part_path(src, PENDING_PROBES, 0).exists()


def test_a_fork_with_the_same_config_repeats_its_source_without_its_first_pass(
        tmp_path, tiny_student, eval_file, source):
    src, ref = source
    fork = tmp_path / "fork"
    metrics, engine = fork_run(fork, tiny_student, eval_file, src)

    assert not asked_in_iteration(engine, 0), "the first teacher pass is copied, not asked for again"
    assert asked_in_iteration(engine, 1)
    assert metrics["forked_from"] == str(src.resolve()) and ref["forked_from"] is None
    for kind in ("train", "rejects-train", "probe", "rejects-probe"):
        assert [r[:3] for r in rows(fork, kind, 0)] == [r[:3] for r in rows(src, kind, 0)], kind
    # The copied probes were scored again by the fork's own student: the same one, so the same band,
    # and from then on the same run (dedup hashes, the label check's totals, the tokens counted).
    assert [m["train"]["loss"] for m in metrics["iterations"]] == [m["train"]["loss"] for m in ref["iterations"]]
    ours, theirs = (json.loads((d / "state.json").read_text()) for d in (fork, src))
    assert {k: ours[k] for k in SHARED_STATE} == {k: theirs[k] for k in SHARED_STATE}
    assert metrics["totals"] == ref["totals"]
    kept = json.loads((fork / FIRST_PASS_FILE).read_text())
    assert kept["forked_from"] == str(src.resolve()) and "mlflow_run_id" not in kept


def test_a_random_band_fork_shares_the_first_pass_and_then_goes_its_own_way(tmp_path, tiny_student, eval_file, source):
    from gold_ray.student.ood import hashed_uniform_scores

    src, _ = source
    fork = tmp_path / "fork"
    metrics, engine = fork_run(fork, tiny_student, eval_file, src, "strategy.score=random", "tracking.enabled=true")
    assert not asked_in_iteration(engine, 0) and metrics["forked_from"] == str(src.resolve())
    assert rows(fork, "train", 0) == rows(src, "train", 0)
    probes = [r for r in read_parts([part_path(fork, "probe", 0)]) if not r["reject_reason"]]
    assert [r["score"] for r in probes] == list(hashed_uniform_scores([{"text": r["text"]} for r in probes]))
    # Its MLflow run has the shared pass's metrics too, as if it had run that stage itself.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=metrics["mlflow"]["tracking_uri"])
    history = client.get_metric_history(metrics["mlflow"]["run_id"], "generate.accepted")
    assert sorted(m.step for m in history) == [0, 1]
    assert {m.step: m.value for m in history}[0] == metrics["iterations"][0]["generate"]["accepted"]


def test_a_fork_of_a_run_stopped_after_its_first_pass_uses_its_pending_probes(tmp_path, tiny_student, eval_file,
                                                                              source):
    _, ref = source
    src = tmp_path / "stopped"
    with pytest.raises(Stop):
        Distiller(make_cfg(src, tiny_student, eval_file), engine=_UnevenTeacher(), on_event=stop_after(0)).run()
    assert part_path(src, PENDING_PROBES, 0).is_file()
    metrics, engine = fork_run(tmp_path / "fork", tiny_student, eval_file, src)
    assert not asked_in_iteration(engine, 0)
    assert [m["feedback"]["ids"] for m in metrics["iterations"]] == [m["feedback"]["ids"] for m in ref["iterations"]]


def test_a_fork_stopped_midway_resumes_to_the_same_run(tmp_path, tiny_student, eval_file, source):
    src, ref = source
    cfg = make_cfg(tmp_path / "fork", tiny_student, eval_file, f"output.fork_from={src}")
    with pytest.raises(Stop):
        Distiller(cfg, engine=_UnevenTeacher(), on_event=stop_after(1)).run()
    engine = _UnevenTeacher()
    metrics = Distiller(cfg, engine=engine, resume=True).run()
    assert not asked_in_iteration(engine, 0) and metrics["forked_from"] == str(src.resolve())
    assert [m["feedback"]["ids"] for m in metrics["iterations"]] == [m["feedback"]["ids"] for m in ref["iterations"]]


@pytest.mark.parametrize(("extra", "named"), [
    (("seed=1",), "seed: 0 there, 1 here"),
    (("strategy.iterations=3",), "strategy.iterations"),
    (("teacher.temperature=0.5",), "teacher.temperature"),
    (("teacher.check_labels=false",), "teacher.check_labels"),
])
def test_a_fork_refuses_a_run_that_differs_before_its_first_pass(tmp_path, tiny_student, eval_file, source, extra,
                                                                 named):
    src, _ = source
    fork = tmp_path / "fork"
    with pytest.raises(ForkError, match=named.replace(".", r"\.")):
        Distiller(make_cfg(fork, tiny_student, eval_file, f"output.fork_from={src}", *extra), engine=_UnevenTeacher())
    assert not fork.exists()


def test_a_bad_fork_with_overwrite_keeps_the_run_it_would_replace(tmp_path, tiny_student, eval_file, source):
    src, _ = source
    before = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    with pytest.raises(ForkError, match="itself"):
        Distiller(make_cfg(src, tiny_student, eval_file, f"output.fork_from={src}", "output.overwrite=true"),
                  engine=_UnevenTeacher())
    other = tmp_path / "other"
    # A fork from a run that differs, into a folder that holds a run: the run stays as it was.
    Distiller(make_cfg(other, tiny_student, eval_file, "seed=1", "strategy.iterations=1", "budget.samples=8"),
              engine=_UnevenTeacher()).run()
    with pytest.raises(ForkError, match="seed"):
        Distiller(make_cfg(src, tiny_student, eval_file, f"output.fork_from={other}", "output.overwrite=true"),
                  engine=_UnevenTeacher())
    assert {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()} == before


def test_a_fork_needs_a_run_with_its_first_pass_committed(tmp_path, tiny_student, eval_file, source):
    src, _ = source
    with pytest.raises(ForkError, match="no such run directory"):
        Distiller(make_cfg(tmp_path / "fork", tiny_student, eval_file, f"output.fork_from={tmp_path / 'none'}"),
                  engine=_UnevenTeacher())
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.yaml", "task.yaml", FIRST_PASS_FILE):
        (bare / name).write_bytes((src / name).read_bytes())
    # Its first pass kept, but not committed (the run died between the two writes), or its parts gone.
    with pytest.raises(ForkError, match="no committed first teacher pass"):
        Distiller(make_cfg(tmp_path / "fork", tiny_student, eval_file, f"output.fork_from={bare}"),
                  engine=_UnevenTeacher())
    (bare / "state.json").write_bytes((src / "state.json").read_bytes())
    with pytest.raises(ForkError, match="train-it000.parquet"):
        Distiller(make_cfg(tmp_path / "fork", tiny_student, eval_file, f"output.fork_from={bare}"),
                  engine=_UnevenTeacher())
    assert not (tmp_path / "fork").exists()


def test_config_differences_skip_the_free_keys_and_name_the_rest():
    saved = {"seed": 0, "student": {"lr": 1.0}, "strategy": {"score": "energy", "name": "gold"}}
    now = {"seed": 0, "student": {"lr": 2.0}, "strategy": {"score": "random", "name": "zerogen"}}
    assert "student" in FREE_KEYS and "strategy.score" in FREE_KEYS
    assert config_differences(saved, now) == ["strategy.name: 'gold' there, 'zerogen' here"]


def test_the_command_line_fork_is_kept_as_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_run_config(None, [], fork_from="runs/gold")
    assert cfg.output.fork_from == str(tmp_path / "runs" / "gold")
