"""The in-process loop end to end on tiny random models and the deterministic fake engine."""

import json
import shutil
import zlib

import pytest

from gold_ray.run.loop import (
    LABEL_CHECK_MIN_READ,
    STAGES,
    Distiller,
    RunDirError,
    label_check_skip_reason,
    stage_metrics,
)
from gold_ray.run.store import StateFileError, read_parts
from gold_ray.testing import FakeTeacherEngine, RecordingEngine, tiny_run_config
from tests.faults.faultkit import write_eval_file


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    """20 rows whose texts name their label, as the fake teacher's samples do (the shared file's do not):
    tests here count the evaluation rows and expect a student that learns to get them right."""
    return write_eval_file(tmp_path_factory.mktemp("loop-eval") / "eval.jsonl", n=20,
                           text="a sample {i} that reads as {label}")


def make_cfg(tmp_path, tiny_student, eval_file, *extra):
    return tiny_run_config(tmp_path / "run", tiny_student, f"task.eval_path={eval_file}", "budget.samples=24",
                           "strategy.probe_fraction=0.5", *extra)


def test_gold_loop_feeds_back_rejects_and_saves(tmp_path, tiny_student, eval_file):
    engine = RecordingEngine(fail_every=5)
    cfg = make_cfg(tmp_path, tiny_student, eval_file)
    metrics = Distiller(cfg, engine=engine).run()
    run = tmp_path / "run"

    it0 = metrics["iterations"][0]
    # Probes come out of the same budget: 24 samples over 2 iterations, half of each on probes.
    assert it0["generate"]["requested"] == 6 and it0["probe"]["requested"] == 6
    assert sum(m["generate"]["requested"] + m["probe"]["requested"] for m in metrics["iterations"]) == 24
    # The train stage's time covers its fit (and the checkpoint and evaluation after it).
    assert it0["train"]["seconds"] >= it0["train"]["fit_seconds"] > 0
    assert it0["generate"]["rejected_by_reason"].get("error", 0) >= 1  # injected failures are kept as rejects
    rejects = read_parts(sorted((run / "data").glob("rejects-*.parquet")))
    assert rejects and all(r["reject_reason"] for r in rejects)

    feedback = it0["feedback"]["ids"]
    assert feedback, "the energy band of the probes must yield feedback"
    fed_texts = {r["text"] for r in read_parts([run / "data" / "probe-it000.parquet"]) if r["id"] in feedback}
    later = [p for p in engine.prompts if p.meta.get("uid", "").startswith("it1-")]
    shown = "\n".join(m["content"] for p in later for m in (p.messages or ())) + "".join(p.text or "" for p in later)
    assert any(t in shown for t in fed_texts), "feedback samples must reach the next iteration's prompts"

    assert "accuracy" in metrics["final"]
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(run / "student")
    assert set(model.config.id2label.values()) == {"negative", "positive"}

    from datasets import load_dataset

    ds = load_dataset("parquet", data_files={"train": str(run / "data" / "train-*.parquet")})["train"]
    assert len(ds) == sum(m["generate"]["accepted"] for m in metrics["iterations"])
    card = (run / "dataset_card.md").read_text()
    assert f"Accepted samples (train and probe parts): {metrics['totals']['accepted']}" in card
    # The final stage measures the diversity of every accepted record, and the card says it.
    diversity = metrics["final"]["diversity"]
    assert diversity["texts"] == metrics["totals"]["accepted"] and 0 < diversity["distinct_2"] <= 1
    assert f"Diversity of {diversity['texts']} sampled texts" in card


def test_zerogen_has_no_probes_or_feedback(tmp_path, tiny_student, eval_file):
    cfg = make_cfg(tmp_path, tiny_student, eval_file, "strategy.name=zerogen")
    metrics = Distiller(cfg, engine=FakeTeacherEngine()).run()
    assert all(m["probe"]["requested"] == 0 for m in metrics["iterations"])
    assert all(m["feedback"]["size"] == 0 for m in metrics["iterations"])
    assert metrics["totals"]["accepted"] > 0


@pytest.mark.slow
def test_the_student_learns_cleanly_separable_data(tmp_path, eval_file):
    # The fake teacher's samples name their label ("... reads as positive in tone"), as does every
    # evaluation row: a student that learns at all from what the run wrote gets them right. The
    # embedded MiniLM, the default student: the tiny random one stays at chance on so few steps
    # (measured: CE loss 0.693 after 48 steps at lr 3e-3).
    cfg = tiny_run_config(tmp_path / "run", "embedded:all-minilm-l6-v2", f"task.eval_path={eval_file}",
                          "strategy.name=zerogen", "strategy.iterations=1", "budget.samples=48", "student.max_length=32",
                          "student.min_steps_per_iteration=0", "student.final_epochs=null",
                          "student.final_min_steps=12", "student.max_epochs=6")
    metrics = Distiller(cfg, engine=FakeTeacherEngine()).run()
    assert metrics["final"]["n"] == 20
    assert metrics["final"]["accuracy"] >= 0.9


def test_existing_run_is_not_clobbered(tmp_path, tiny_student, eval_file):
    cfg = make_cfg(tmp_path, tiny_student, eval_file, "strategy.iterations=1", "budget.samples=8")
    Distiller(cfg, engine=FakeTeacherEngine()).run()
    before = (tmp_path / "run" / "state.json").read_bytes()
    with pytest.raises(RunDirError, match="--resume"):
        Distiller(cfg, engine=FakeTeacherEngine())
    assert (tmp_path / "run" / "state.json").read_bytes() == before


class CrashAfter(Exception):
    pass


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, tiny_student, eval_file):
    ref_cfg = make_cfg(tmp_path / "ref", tiny_student, eval_file)
    ref = Distiller(ref_cfg, engine=FakeTeacherEngine()).run()

    cfg = make_cfg(tmp_path / "crash", tiny_student, eval_file)
    events = []

    def crash_in_iteration_1(stage, info):
        if stage not in STAGES:  # the plan, progress counts and log lines are not stage commits
            return
        events.append((info["iteration"], stage))
        if (info["iteration"], stage) == (1, "generate"):
            raise CrashAfter

    with pytest.raises(CrashAfter):
        Distiller(cfg, engine=FakeTeacherEngine(), on_event=crash_in_iteration_1).run()
    resumed = Distiller(cfg, engine=FakeTeacherEngine(), resume=True).run()

    for key in ("accepted",):
        assert resumed["totals"][key] == ref["totals"][key]
    assert [m["feedback"]["ids"] for m in resumed["iterations"]] == [m["feedback"]["ids"] for m in ref["iterations"]]
    ids = [r["id"] for r in read_parts(sorted((tmp_path / "crash" / "run" / "data").glob("*.parquet")))]
    assert len(ids) == len(set(ids)), "no committed sample is repeated"


def test_a_crash_between_checkpoint_and_commit_resumes_the_committed_student(tmp_path, tiny_student, eval_file,
                                                                               monkeypatch):
    """Iteration 1's train stage saves its checkpoint, then dies evaluating, before its commit: the
    committed state still names iteration 0's checkpoint, which must still be there to continue from."""
    ref = Distiller(make_cfg(tmp_path / "ref", tiny_student, eval_file), engine=FakeTeacherEngine()).run()

    cfg = make_cfg(tmp_path / "crash", tiny_student, eval_file)
    real, calls = Distiller._evaluate, []

    def dies_in_the_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise CrashAfter
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Distiller, "_evaluate", dies_in_the_second)
    with pytest.raises(CrashAfter):
        Distiller(cfg, engine=FakeTeacherEngine()).run()
    monkeypatch.setattr(Distiller, "_evaluate", real)
    run = tmp_path / "crash" / "run"
    committed = json.loads((run / "state.json").read_text())
    assert (committed["iteration"], committed["stage"]) == (1, "generate")
    assert (run / committed["checkpoint"]).is_dir()

    resumed = Distiller(cfg, engine=FakeTeacherEngine(), resume=True).run()
    assert [m["train"]["loss"] for m in resumed["iterations"]] == [m["train"]["loss"] for m in ref["iterations"]]
    assert [m["feedback"]["ids"] for m in resumed["iterations"]] == [m["feedback"]["ids"] for m in ref["iterations"]]


def test_a_missing_committed_checkpoint_is_an_error_naming_it(tmp_path, tiny_student, eval_file):
    cfg = make_cfg(tmp_path, tiny_student, eval_file)

    def crash_after_iteration_0(stage, info):
        if (info.get("iteration"), stage) == (0, "feedback"):
            raise CrashAfter

    with pytest.raises(CrashAfter):
        Distiller(cfg, engine=FakeTeacherEngine(), on_event=crash_after_iteration_0).run()
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    shutil.rmtree(tmp_path / "run" / state["checkpoint"])
    with pytest.raises(StateFileError, match=f"checkpoint '{state['checkpoint']}'"):
        Distiller(cfg, engine=FakeTeacherEngine(), resume=True).run()


def test_resuming_a_finished_run_writes_again_what_follows_its_last_commit(tmp_path, tiny_student, eval_file):
    cfg = make_cfg(tmp_path, tiny_student, eval_file, "strategy.iterations=1", "budget.samples=8")
    metrics = Distiller(cfg, engine=FakeTeacherEngine()).run()
    run = tmp_path / "run"
    card = (run / "dataset_card.md").read_text()
    # As if the run died right after committing its end: metrics stale, checkpoint kept, no card.
    (run / "metrics.json").write_text("{}")
    (run / "checkpoints" / "it000").mkdir(parents=True)
    (run / "dataset_card.md").unlink()
    assert Distiller(cfg, engine=FakeTeacherEngine(), resume=True).run() == metrics
    assert json.loads((run / "metrics.json").read_text()) == metrics
    assert not (run / "checkpoints").exists() and (run / "dataset_card.md").read_text() == card


def test_fresh_student_head_follows_the_run_seed(tmp_path, tiny_student, eval_file):
    """A new in-process student's head is drawn from the run seed, as the Ray train stage draws it."""
    import torch

    from gold_ray.student.model import build_student

    def fresh(seed):
        distiller = Distiller(make_cfg(tmp_path / f"s{seed}", tiny_student, eval_file, f"seed={seed}"),
                              engine=FakeTeacherEngine())
        return distiller, dict(distiller._new_student().model.named_parameters())

    distiller, w1 = fresh(1)
    _, w0 = fresh(0)
    drawn = [n for n in w0 if not torch.equal(w0[n], w1[n])]
    assert drawn, "seeds 0 and 1 gave the same fresh student"
    assert all(n.startswith(("classifier", "score")) for n in drawn), drawn
    ray_side = dict(build_student(distiller.task, distiller.cfg.student, tiny_student, seed=1).model.named_parameters())
    assert all(torch.equal(w1[n], ray_side[n]) for n in w1)


def test_random_score_control_feeds_back_a_band_ranked_by_text_hash(tmp_path, tiny_student, eval_file):
    import numpy as np

    from gold_ray.student.ood import band_indices, hashed_uniform_scores

    cfg = make_cfg(tmp_path, tiny_student, eval_file, "strategy.score=random", "budget.samples=48")
    metrics = Distiller(cfg, engine=FakeTeacherEngine()).run()
    probes = [r for r in read_parts([tmp_path / "run" / "data" / "probe-it000.parquet"]) if not r["reject_reason"]]
    scores = np.array([r["score"] for r in probes])
    np.testing.assert_array_equal(scores, hashed_uniform_scores([{"text": r["text"]} for r in probes]))
    band = {probes[i]["id"] for i in band_indices(scores, cfg.strategy.band_lo, cfg.strategy.band_hi)}
    assert band and set(metrics["iterations"][0]["feedback"]["ids"]) == band


@pytest.mark.parametrize("hold", [True, False])
def test_a_student_near_chance_adds_no_band_when_the_band_is_held(tmp_path, tiny_student, eval_file, monkeypatch,
                                                                   hold):
    import gold_ray.run.loop as loop_module

    checked = loop_module.learning_check
    # Every student near chance, whatever the tiny model learns from the fake teacher.
    monkeypatch.setattr(loop_module, "learning_check", lambda *a: {**checked(*a), "near_chance": True})
    cfg = make_cfg(tmp_path, tiny_student, eval_file, f"strategy.hold_band_near_chance={str(hold).lower()}")
    feedback = [m["feedback"] for m in Distiller(cfg, engine=FakeTeacherEngine()).run()["iterations"]]
    if hold:
        # The pool stays empty, and no band is reported as picked at random.
        assert all(f["band_held"] and f["size"] == 0 and not f["near_chance"] for f in feedback)
    else:
        assert all(f["size"] > 0 and f["near_chance"] and "band_held" not in f for f in feedback)


def test_iteration_eval_limit_bounds_only_the_per_iteration_evaluation(tmp_path, tiny_student, eval_file):
    cfg = make_cfg(tmp_path, tiny_student, eval_file, "task.iteration_eval_limit=6", "strategy.name=zerogen")
    metrics = Distiller(cfg, engine=FakeTeacherEngine()).run()
    assert [m["train"]["n"] for m in metrics["iterations"]] == [6, 6]
    assert metrics["final"]["n"] == 20


def test_the_student_trains_past_a_floor_and_the_final_recipe_is_chosen_on_a_synthetic_split(
        tmp_path, tiny_student, eval_file):
    # Enough samples for a synthetic validation split (10 % of them, at least 16), default training.
    cfg = tiny_run_config(tmp_path / "run", tiny_student, f"task.eval_path={eval_file}", "budget.samples=240",
                          "strategy.probe_fraction=0.25", "student.final_epochs=null", "student.max_epochs=4",
                          "student.min_steps_per_iteration=20", "student.final_min_steps=20")
    metrics = Distiller(cfg, engine=FakeTeacherEngine()).run()
    it0, it1 = (m["train"] for m in metrics["iterations"])
    # The floor: 20 steps of batches of 8, whatever the data (capped at 4 epochs).
    assert it0["steps"] >= min(20, 4 * -(-it0["records"] // 8)) and it0["epochs"] >= 2
    assert it0["chance_loss"] == pytest.approx(0.6931, abs=1e-4) and "near_chance" in it0
    assert it1["val_records"] >= 16 and "val_accuracy" in it1 and it1["records"] + it1["val_records"] <= it1["available"]
    assert "score_iqr" in metrics["iterations"][0]["probe"]
    final = metrics["final"]
    # GOLD's own loss (SCE) and CE were both trained; one was kept, and its metrics are the student's.
    assert [t["recipe"].split("-")[0] for t in final["recipes"]] == ["sce", "ce"]
    assert final["recipe"] in {t["recipe"] for t in final["recipes"]} and final["val_records"] >= 16
    # Checkpoints only serve a resume: a finished run keeps one copy of the student.
    assert not (tmp_path / "run" / "checkpoints").exists() and (tmp_path / "run" / "student").is_dir()


def test_stages_report_their_counts_through_on_event(tmp_path, tiny_student, eval_file, monkeypatch):
    import gold_ray.run.loop as loop_module
    from gold_ray.run.runtime import StageProgress

    # Every count, not one a second: what the runtime reports, before the rate bound.
    monkeypatch.setattr(loop_module, "StageProgress", lambda emit: StageProgress(emit, min_interval_s=0))
    events = []
    cfg = make_cfg(tmp_path, tiny_student, eval_file, "teacher.batch_size=4")
    metrics = Distiller(cfg, engine=FakeTeacherEngine(fail_every=5), on_event=lambda s, i: events.append((s, i))).run()
    assert events[0] == ("plan", {"iterations": 2, "samples": [[6, 6], [6, 6]]})
    progress = [i for s, i in events if s == "progress"]
    it0 = metrics["iterations"][0]

    def counts(stage, unit, iteration=0):
        return [(i["done"], i["total"]) for i in progress
                if i["stage"] == stage and i["unit"] == unit and i["iteration"] == iteration]

    # The teacher's samples, one engine batch (4) at a time, with the rejects so far: GOLD's 6
    # training prompts and 6 probes go in one pass.
    assert counts("generate", "samples") == [(0, 12), (4, 12), (8, 12), (12, 12)]
    last = [i for i in progress if i["stage"] == "generate" and i["iteration"] == 0][-1]
    assert last["rejected"] == it0["generate"]["rejected"] + it0["probe"]["rejected"] >= 1
    # Training steps done of planned.
    steps = counts("train", "steps")
    assert steps[0] == (0, steps[0][1]) and steps[-1][0] == it0["train"]["steps"] <= steps[0][1]
    assert [d for d, _ in steps] == list(range(len(steps)))
    # Probes: written in that pass, then scored by the trained student in the probe stage.
    assert counts("probe", "samples") == []
    assert counts("probe", "scored")[-1] == (it0["probe"]["accepted"], it0["probe"]["accepted"])
    # The final stage trains each candidate recipe, each its own phase.
    phases = {i["phase"] for i in progress if i["stage"] == "final" and i["unit"] == "steps"}
    assert {r["recipe"] for r in metrics["final"]["recipes"]} == phases
    # Each stage's counts come before the stage's own event.
    order = [s if s != "progress" else f"progress:{i['stage']}" for s, i in events]
    assert order.index("progress:train") > order.index("generate") and order.index("train") > order.index("progress:train")


class _ReadsEverythingAs(FakeTeacherEngine):
    """The fake teacher, reading every sample back as one label (a teacher that disagrees with itself)."""

    def __init__(self, word: str, **kwargs):
        super().__init__(**kwargs)
        self.word = word
        self.read = 0

    def option_logprobs(self, prompts, options):
        self.read += len(prompts)
        return [[0.0 if option == self.word else -5.0 for option in options] for _ in prompts]


class _ReadsSomeWrong(FakeTeacherEngine):
    """The fake teacher, reading about a quarter of its samples back as another label, evenly over
    the labels (an imperfect but fair reader: what the label check is for)."""

    def option_logprobs(self, prompts, options):
        rows = super().option_logprobs(prompts, options)
        for i, prompt in enumerate(prompts):
            if zlib.crc32(prompt.messages[-1]["content"].encode()) % 4 == 0:
                rows[i] = rows[i][1:] + rows[i][:1]  # the next label's score: read as another label
        return rows


def test_the_label_check_rejects_the_samples_the_teacher_reads_as_another_label(tmp_path, tiny_student, eval_file):
    cfg = make_cfg(tmp_path, tiny_student, eval_file, "strategy.name=zerogen", "strategy.iterations=1",
                   "baselines.teacher_fewshot=false", "teacher.check_labels=true")
    metrics = Distiller(cfg, engine=_ReadsSomeWrong()).run()
    gen = metrics["iterations"][0]["generate"]
    data = tmp_path / "run" / "data"
    kept = read_parts([data / "train-it000.parquet"])
    checked = [r for r in read_parts([data / "rejects-train-it000.parquet"]) if r["reject_reason"] == "label_check"]
    assert kept and {r["label"] for r in kept} == {"negative", "positive"}
    # A rejected sample keeps its text and the label it was written for, and says what the teacher read.
    other = {"negative": "positive", "positive": "negative"}
    assert checked and all(r["text"] and f"{other[r['label']]!r}" in r["reject_detail"] for r in checked)
    check = gen["label_check"]
    assert "skipped" not in check and check["rejected"] == len(checked) == gen["rejected_by_reason"]["label_check"]
    assert check["checked"] == len(kept) + len(checked) == gen["accepted"] + len(checked)
    assert sum(a for a, _ in check["agreement"].values()) == len(kept)
    # The run's totals, which the decision reads, are kept with the run (a resumed run goes on from them).
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["label_agreement"] == check["agreement"]


def test_the_label_check_rejects_nothing_when_the_teacher_leans_to_one_label(tmp_path, tiny_student, eval_file):
    # A teacher that reads everything as one label would leave only that label: the check stands down.
    cfg = make_cfg(tmp_path, tiny_student, eval_file, "strategy.name=zerogen", "strategy.iterations=1",
                   "baselines.teacher_fewshot=false", "teacher.check_labels=true")
    engine = _ReadsEverythingAs("negative")
    metrics = Distiller(cfg, engine=engine).run()
    check = metrics["iterations"][0]["generate"]["label_check"]
    kept = read_parts([tmp_path / "run" / "data" / "train-it000.parquet"])
    assert engine.read > 0 and check["rejected"] == 0 and "lean to 'negative'" in check["skipped"]
    assert check["agreement"]["positive"][0] == 0 and {r["label"] for r in kept} == {"negative", "positive"}


def test_label_check_skip_reason_names_a_lean_and_a_reader_at_chance():
    assert label_check_skip_reason({"positive": [12, 20], "negative": [15, 20]}, 2) is None
    assert "lean to 'Sports'" in label_check_skip_reason(
        {"Sports": [20, 20], "World": [3, 20], "Business": [9, 20], "Sci/Tech": [10, 20]}, 4)
    assert "no more often than chance" in label_check_skip_reason({"a": [5, 10], "b": [5, 10]}, 2)
    # Labels with too few readings do not count towards a lean.
    assert label_check_skip_reason({"a": [9, 10], "b": [0, LABEL_CHECK_MIN_READ - 1]}, 2) is None
    assert label_check_skip_reason({}, 2) is None


def test_the_label_check_off_asks_the_teacher_nothing(tmp_path, tiny_student, eval_file):
    off = make_cfg(tmp_path / "off", tiny_student, eval_file, "strategy.name=zerogen", "strategy.iterations=1",
                   "baselines.teacher_fewshot=false", "teacher.check_labels=false")
    engine = _ReadsEverythingAs("negative")
    metrics = Distiller(off, engine=engine).run()
    assert engine.read == 0 and "label_check" not in metrics["iterations"][0]["generate"]
    assert {r["label"] for r in read_parts([tmp_path / "off" / "run" / "data" / "train-it000.parquet"])} == {
        "negative", "positive"}


def test_a_stages_nested_numbers_get_dotted_metric_names():
    assert stage_metrics("final", {"accuracy": 0.8, "diversity": {"distinct_2": 0.5, "texts": 3}, "loss": "sce"}) == {
        "final.accuracy": 0.8, "final.diversity.distinct_2": 0.5, "final.diversity.texts": 3, "final.loss": "sce"}
