"""LLKD: the teacher labels an unlabelled pool (and texts it wrote); selection by teacher confidence and
student uncertainty with class-wise thresholds that move with time; committed and resumable."""

import json
import math

import numpy as np
import pytest

from gold_ray.config import ConfigError, load_config
from gold_ray.run.loop import Distiller
from gold_ray.run.store import read_parts
from gold_ray.run.tasks import load_task
from gold_ray.strategies.llkd import normalised_entropy, update_thresholds
from gold_ray.teacher.labelling import OPTIONS_KEY, RECORD_KEY
from gold_ray.testing import FakeTeacherEngine, RecordingEngine, tiny_run_config
from tests.faults.faultkit import write_data_dir

SST2 = load_task("sst2")


class CrashAfter(Exception):
    pass


def test_thresholds_are_class_wise_and_move_with_momentum():
    mem = {}
    tau = update_thresholds(mem, np.array([0.9, 0.7, 0.6, np.nan]), ["a", "a", "b", "b"], ["a", "b", "c"], 0.5)
    # First step: the statistics themselves; tau(y) = global mean * class mean / best class mean.
    g = (0.9 + 0.7 + 0.6) / 3
    assert tau["a"] == pytest.approx(g) and tau["b"] == pytest.approx(g * 0.6 / 0.8)
    assert math.isnan(tau["c"]), "a class never seen has no threshold yet"
    tau = update_thresholds(mem, np.array([0.5, 0.5]), ["a", "b"], ["a", "b", "c"], 0.5)
    g2 = 0.5 * g + 0.5 * 0.5
    a2, b2 = 0.5 * 0.8 + 0.25, 0.5 * 0.6 + 0.25
    assert tau["a"] == pytest.approx(g2) and tau["b"] == pytest.approx(g2 * b2 / a2)


def test_normalised_entropy_spans_certain_to_uniform():
    u = normalised_entropy(np.array([[0.0, 0.0, 0.0], [50.0, 0.0, 0.0]]))
    assert u[0] == pytest.approx(1.0) and u[1] == pytest.approx(0.0, abs=1e-6)


class StubStudent:
    """Returns fixed class logits per record id (so the student's uncertainty is chosen by the test)."""

    def __init__(self, logits):
        self.by_id = logits

    def logits(self, records):
        return np.array([self.by_id[r["id"]] for r in records], dtype=float)


def test_selection_keeps_texts_the_teacher_is_sure_of_and_the_student_is_not():
    from gold_ray.strategies import StrategyContext, build_strategy

    cfg = load_config(None, ["strategy.name=llkd"])
    strategy = build_strategy("llkd")
    records = [
        {"id": "n-sure-unsure", "label": "negative", "confidence": 0.9},
        {"id": "n-unsure-unsure", "label": "negative", "confidence": 0.6},
        {"id": "p-sure-sure", "label": "positive", "confidence": 0.8},
        {"id": "p-sure-unsure", "label": "positive", "confidence": 0.8},
    ]
    student = StubStudent({"n-sure-unsure": [0, 0], "n-unsure-unsure": [0, 0], "p-sure-sure": [4, 0],
                           "p-sure-unsure": [0, 0.3]})
    ctx = StrategyContext(task=SST2, config=cfg, prompt_style="chat", rng=np.random.default_rng(0), iteration=0,
                          student=student)
    assert strategy.train_mask(ctx, records) == [True, False, False, True]
    assert ctx.memory["llkd"]["selected"] == ["n-sure-unsure", "p-sure-unsure"]
    assert ctx.stats["llkd_selected"] == 2 and ctx.stats["llkd_labelled"] == 4

    # Next iteration: the student has learnt the first text and is now unsure of the third.
    student.by_id.update({"n-sure-unsure": [6, 0], "p-sure-sure": [0, 0.1]})
    ctx.iteration, ctx.stats = 1, {}
    mask = strategy.train_mask(ctx, records)
    assert mask[0] is False and mask[2] is True
    # The final student trains on every text selected at least once.
    assert strategy.keep_for_training(ctx, records) == [True, False, True, True]


def test_answers_without_confidence_pass_the_teacher_test():
    from gold_ray.strategies import StrategyContext, build_strategy

    strategy = build_strategy("llkd")
    records = [{"id": "a", "label": "negative", "confidence": float("nan")},
               {"id": "b", "label": "positive", "confidence": float("nan")}]
    ctx = StrategyContext(task=SST2, config=load_config(None, ["strategy.name=llkd"]), prompt_style="chat",
                          rng=np.random.default_rng(0), iteration=0, student=StubStudent({"a": [0, 0], "b": [0, 0]}))
    assert strategy.train_mask(ctx, records) == [True, True]


def test_batch_calibration_removes_the_teachers_label_prior():
    from gold_ray.strategies import StrategyContext, build_strategy

    def rec(i, p_neg):
        return {"id": f"r{i}", "text": f"text {i}", "label": "positive", "confidence": 1 - p_neg,
                "option_logprobs": json.dumps([math.log(p_neg), math.log(1 - p_neg)])}

    # The teacher says "positive" to everything, but relatively less so for r0 and r2.
    labelled = [rec(0, 0.45), rec(1, 0.05), rec(2, 0.40), rec(3, 0.10)]
    strategy = build_strategy("llkd")

    def ctx(calibration):
        cfg = load_config(None, ["strategy.name=llkd", f"strategy.llkd_calibration={calibration}"])
        return StrategyContext(task=SST2, config=cfg, prompt_style="chat", rng=np.random.default_rng(0), iteration=0)

    out = strategy.review_labels(ctx("batch"), labelled)
    assert [r["label"] for r in out] == ["negative", "positive", "negative", "positive"]
    # Mean label probability (0.25, 0.75): r0 becomes (0.45/0.25, 0.55/0.75), renormalised.
    assert out[0]["confidence"] == pytest.approx(1.8 / (1.8 + 0.55 / 0.75))
    assert out[0]["option_logprobs"] == labelled[0]["option_logprobs"], "the raw scores are kept"
    assert strategy.review_labels(ctx("none"), labelled) == labelled
    with pytest.raises(ConfigError, match="llkd_calibration"):
        load_config(None, ["strategy.llkd_calibration=platt"])


@pytest.fixture
def data_dir(tmp_path):
    return write_data_dir(tmp_path / "data", pairs=4)


def cfg_for(out, tiny_student, data_dir, *extra):
    return tiny_run_config(out, tiny_student, f"task.data_dir={data_dir}", "strategy.name=llkd", "budget.samples=40",
                           *extra)


def test_llkd_labels_pool_and_written_texts_and_trains_on_its_selection(tmp_path, tiny_student, data_dir):
    engine = RecordingEngine(task=SST2)
    # No teacher row at the end: its classify prompts would join the budget's count below.
    cfg = cfg_for(tmp_path / "run", tiny_student, data_dir, "baselines.teacher_fewshot=false")
    metrics = Distiller(cfg, engine=engine).run()
    its = metrics["iterations"]
    data = tmp_path / "run" / "data"

    # Budget: every request counts, writing and labelling alike (20 per iteration).
    assert len(engine.prompts) + len(engine.scored) == 40
    assert all(m["generate"]["requested"] == 20 for m in its)
    # Each iteration labels its share of the 8 pool texts (4) and writes (20 - 4) // 2 = 8 texts.
    assert [m["generate"]["written"] for m in its] == [8, 8]
    assert all(p.kind == "classify" and p.meta[OPTIONS_KEY] == ["negative", "positive"] for p in engine.scored)
    labelled_texts = [p.meta[RECORD_KEY]["text"] for p in engine.scored]
    pool_texts = [json.loads(line)["text"] for line in (data_dir / "sst2" / "seed.jsonl").read_text().splitlines()]
    assert sorted(t for t in labelled_texts if t in pool_texts) == sorted(pool_texts)

    labelled = read_parts(sorted(data.glob("train-*.parquet")))
    written = read_parts(sorted(data.glob("pool-*.parquet")))
    assert len(labelled) == 24 and len(written) == 16 and all(r["label"] is None for r in written)
    # The teacher's label (the fake teacher reads the label word in the text) and its confidence.
    assert all(r["label"] in r["text"] for r in labelled)
    assert all(0.5 < r["confidence"] <= 1.0 for r in labelled)
    assert all(len(json.loads(r["option_logprobs"])) == 2 for r in labelled)

    # The pool part is never trained on; the student trains on its selection.
    assert its[1]["train"]["available"] == 24
    # The student trains on its selection, less the hashed validation share that a continued student
    # keeps out of training (used once there are enough such records; how many depends on the texts).
    assert its[1]["train"]["records"] + its[1]["train"]["val_records"] <= its[1]["train"]["llkd_selected"] <= 24
    ever = its[1]["train"]["llkd_selected_ever"]
    assert metrics["final"]["records"] == ever
    assert {"llkd_tau_teacher_positive", "llkd_tau_student_negative"} <= set(its[0]["train"])


def test_llkd_resumes_with_the_committed_thresholds(tmp_path, tiny_student, data_dir):
    ref = Distiller(cfg_for(tmp_path / "ref", tiny_student, data_dir), engine=FakeTeacherEngine(task=SST2)).run()

    def crash(stage, info):
        if (info.get("iteration"), stage) == (1, "generate"):
            raise CrashAfter

    cfg = cfg_for(tmp_path / "crash", tiny_student, data_dir)
    with pytest.raises(CrashAfter):
        Distiller(cfg, engine=FakeTeacherEngine(task=SST2), on_event=crash).run()
    state = json.loads((tmp_path / "crash" / "state.json").read_text())
    assert state["strategy_state"]["llkd"]["teacher"]["global"] > 0
    resumed = Distiller(cfg, engine=FakeTeacherEngine(task=SST2), resume=True).run()
    keys = [k for k in ref["iterations"][1]["train"] if k.startswith("llkd_")]
    assert [resumed["iterations"][1]["train"][k] for k in keys] == [ref["iterations"][1]["train"][k] for k in keys]
    assert resumed["final"]["records"] == ref["final"]["records"]


def test_llkd_refuses_the_evaluation_file_as_its_pool(tmp_path, tiny_student, data_dir):
    cfg = cfg_for(tmp_path / "run", tiny_student, data_dir, "task.unlabeled_path=sst2/test.jsonl")
    with pytest.raises(ConfigError, match=r"task\.unlabeled_path: .*is the evaluation \(test\) file"):
        Distiller(cfg, engine=FakeTeacherEngine())
    assert not (tmp_path / "run").exists()


def test_llkd_pool_records_need_the_input_fields(tmp_path, tiny_student, data_dir):
    bad = tmp_path / "pool.jsonl"
    bad.write_text('{"text": "fine text here"}\n\n{"title": "no text"}\n')  # blank lines count as lines
    cfg = cfg_for(tmp_path / "run", tiny_student, data_dir, f"task.unlabeled_path={bad}")
    with pytest.raises(ConfigError, match=r"task\.unlabeled_path: .*pool\.jsonl:3: missing or empty field 'text'"):
        Distiller(cfg, engine=FakeTeacherEngine())


def test_llkd_momentum_is_checked():
    with pytest.raises(ConfigError, match="llkd_momentum"):
        load_config(None, ["strategy.llkd_momentum=1.0"])


def test_llkd_warns_when_the_pool_is_far_smaller_than_the_budget(tmp_path, tiny_student, data_dir, caplog):
    """8 pool texts for 40 calls: the teacher writes the rest, so 8 + 32 // 2 = 24 texts get labelled."""
    with caplog.at_level("WARNING", logger="gold_ray.strategies.llkd"):
        Distiller(cfg_for(tmp_path / "small", tiny_student, data_dir), engine=FakeTeacherEngine(task=SST2))
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "task.unlabeled_path" in message and "holds 8 texts for budget.samples=40" in message
    assert "about 24 texts get labelled" in message
    caplog.clear()
    with caplog.at_level("WARNING", logger="gold_ray.strategies.llkd"):
        Distiller(cfg_for(tmp_path / "enough", tiny_student, data_dir, "budget.samples=16"),
                  engine=FakeTeacherEngine(task=SST2))
    assert not caplog.records
