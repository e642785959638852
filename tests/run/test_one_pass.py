"""One teacher pass per iteration (issue 18 item 2): GOLD's probes are written with the training
samples in the generate stage and only scored in the probe stage."""

import math

import pytest

from gold_ray.run.loop import Distiller, split_pass_stats
from gold_ray.run.store import PENDING_PROBES, part_path, read_parts
from gold_ray.strategies.gold import GoldStrategy
from gold_ray.testing import FakeTeacherEngine, tiny_run_config


class CountingEngine(FakeTeacherEngine):
    """The fake engine, remembering what each ``generate`` call carried (iteration and kind, from the uids)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.batches: list[list[str]] = []

    def generate(self, prompts, params):
        self.batches.append([p.meta["uid"].rsplit("-", 1)[0] for p in prompts])
        return super().generate(prompts, params)


class CrashAfter(Exception):
    pass


def make_cfg(out, tiny_student, eval_file, *extra):
    # Few training steps: these tests are about what the teacher is asked and what is stored.
    return tiny_run_config(out, tiny_student, f"task.eval_path={eval_file}", "budget.samples=24",
                           "strategy.probe_fraction=0.5", "student.min_steps_per_iteration=2",
                           "student.final_min_steps=2", "student.max_epochs=1", *extra)


def test_gold_asks_the_teacher_once_per_iteration_and_trains_on_probes_only_afterwards(
        tmp_path, tiny_student, eval_file):
    assert GoldStrategy.probes_before_training
    engine = CountingEngine()
    metrics = Distiller(make_cfg(tmp_path / "run", tiny_student, eval_file), engine=engine).run()
    # The final stage's teacher-as-classifier row is not an iteration's pass.
    passes = [b for b in engine.batches if any(k.startswith("it") for k in b)]
    assert [sorted(set(b)) for b in passes] == [["it0-probe", "it0-train"], ["it1-probe", "it1-train"]]
    assert all(b.count(f"it{i}-train") == 6 and b.count(f"it{i}-probe") == 6 for i, b in enumerate(passes))

    it0, it1 = metrics["iterations"]
    for m in (it0, it1):
        assert m["generate"]["requested"] == 6 and m["probe"]["requested"] == 6
        assert m["generate"]["teacher_pass"] == m["probe"]["teacher_pass"] == "shared"
    # This iteration's probes are a hold-out for its training and training data afterwards.
    assert it0["train"]["available"] == it0["generate"]["accepted"]
    assert it1["train"]["available"] == (it0["generate"]["accepted"] + it0["probe"]["accepted"]
                                         + it1["generate"]["accepted"])
    assert metrics["teacher_tokens"] == sum(m[s]["output_tokens"] for m in (it0, it1) for s in ("generate", "probe"))

    run = tmp_path / "run"
    probes = read_parts([part_path(run, "probe", 0)])
    assert [r["id"] for r in probes] == [f"it000-probe-{i:05d}" for i in range(len(probes))]
    assert all(r["kind"] == "probe" and math.isfinite(r["score"]) for r in probes)
    assert it0["feedback"]["ids"] and set(it0["feedback"]["ids"]) <= {r["id"] for r in probes}
    assert not list((run / "data").glob(f"{PENDING_PROBES}-*")), "pending probes are removed once committed"


def test_a_run_resumed_between_generate_and_probe_matches_an_unbroken_one(tmp_path, tiny_student, eval_file):
    ref = Distiller(make_cfg(tmp_path / "ref", tiny_student, eval_file), engine=CountingEngine()).run()

    cfg = make_cfg(tmp_path / "crash", tiny_student, eval_file)

    def crash_after_generate(stage, info):
        if stage == "generate" and info.get("iteration") == 1:
            raise CrashAfter

    with pytest.raises(CrashAfter):
        Distiller(cfg, engine=CountingEngine(), on_event=crash_after_generate).run()
    assert part_path(tmp_path / "crash", PENDING_PROBES, 1).is_file()
    engine = CountingEngine()
    resumed = Distiller(cfg, engine=engine, resume=True).run()
    assert not any(k.startswith("it") for b in engine.batches for k in b), "committed probes are not asked again"

    def records(run):
        rows = read_parts(sorted((run / "data").glob("*.parquet")))
        return {r["id"]: (r["raw_text"], r["reject_reason"], r["label"]) for r in rows}, \
            {r["id"]: r["score"] for r in rows if r["kind"] == "probe"}

    (got, got_scores), (want, want_scores) = records(tmp_path / "crash"), records(tmp_path / "ref")
    assert got == want, "no sample lost or repeated, each the same"
    assert got_scores == pytest.approx(want_scores, abs=1e-5)
    assert [m["feedback"]["ids"] for m in resumed["iterations"]] == [m["feedback"]["ids"] for m in ref["iterations"]]
    assert resumed["teacher_tokens"] == ref["teacher_tokens"]


def test_a_pass_is_split_by_output_tokens_and_counts():
    stats = {"seconds": 10.0, "output_tokens": 400, "prompt_tokens": 900, "tokens_per_s": 40.0, "retried": 2}
    train, probe = split_pass_stats(stats, [6, 3], [300, 100])
    assert (train["output_tokens"], probe["output_tokens"]) == (300, 100)
    assert (train["seconds"], probe["seconds"]) == (7.5, 2.5)
    assert (train["prompt_tokens"], probe["prompt_tokens"]) == (600, 300)
    assert train["retried"] == 2 and "retried" not in probe
    assert probe["samples_per_s"] == round(3 / 2.5, 3)
