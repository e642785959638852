"""ProGen: influence-ranked in-context feedback, a held-out synthetic validation split, the same budget."""


import numpy as np
import pytest

from gold_ray.config import ConfigError, load_config
from gold_ray.run.loop import Distiller
from gold_ray.run.store import read_parts
from gold_ray.run.tasks import load_task
from gold_ray.strategies import StrategyContext, build_strategy
from gold_ray.strategies.progen import in_validation_split
from gold_ray.testing import FakeTeacherEngine, RecordingEngine, tiny_run_config

SST2 = load_task("sst2")


def cfg_for(tmp_path, tiny_student, eval_file, *extra):
    return tiny_run_config(tmp_path / "run", tiny_student, f"task.eval_path={eval_file}", "strategy.name=progen",
                           "budget.samples=48", "strategy.progen_val_fraction=0.25",
                           "strategy.progen_feedback_ratio=1.0", *extra)


def test_a_planted_mislabelled_record_ranks_last_through_a_trained_student(tiny_student_no_dropout):
    from gold_ray.student.model import ClassifierStudent

    rng = np.random.default_rng(0)
    pos, neg = ["great", "wonderful", "brilliant", "moving", "superb"], ["awful", "boring", "dreadful", "dull", "clumsy"]

    def rec(i, words, label):
        return {"id": f"r{i}", "text": " ".join(rng.choice(words, 3)) + " film", "label": label}

    train = [rec(i, pos, "positive") if i % 2 else rec(i, neg, "negative") for i in range(40)]
    train.append({"id": "planted", "text": "great wonderful brilliant film", "label": "negative"})
    val = [rec(100 + i, pos, "positive") if i % 2 else rec(100 + i, neg, "negative") for i in range(20)]
    # Dropout off: the ranking asserted is that of one exact, noise-free fit.
    student = ClassifierStudent(SST2, tiny_student_no_dropout, device="cpu", lr=1e-3)
    student.fit(train, 8)

    cfg = load_config(None, ["strategy.name=progen", "strategy.feedback_pool_size=40"])
    strategy = build_strategy("progen")
    ctx = StrategyContext(task=SST2, config=cfg, prompt_style="chat", rng=np.random.default_rng(0), iteration=0,
                          student=student)
    infl = strategy.influence(ctx, train, val)
    assert int(np.argmax(infl)) == len(train) - 1, "the mislabelled record must be ranked last (most harmful)"

    # Through update_feedback: with a pool big enough for every helpful record, the planted one stays out.
    ctx.records = lambda: train + val
    strategy._is_val = lambda ctx, r: r["id"].startswith("r1") and len(r["id"]) == 4  # r100..r119
    pool = strategy.update_feedback(ctx, [])
    assert pool and "planted" not in {r["id"] for r in pool}
    assert all(r["influence"] < 0 for r in pool)


def test_progen_holds_out_its_validation_split_and_feeds_back_by_label(tmp_path, tiny_student, eval_file):
    engine = RecordingEngine(task=SST2)
    cfg = cfg_for(tmp_path, tiny_student, eval_file)
    metrics = Distiller(cfg, engine=engine).run()
    run = tmp_path / "run"
    its = metrics["iterations"]

    # The budget is the generation budget: no extra teacher calls for feedback.
    assert sum(m["generate"]["requested"] for m in its) == 48 and len(engine.prompts) == 48

    records = read_parts(sorted((run / "data").glob("train-*.parquet")))
    val_ids = {r["id"] for r in records if in_validation_split(r["id"], cfg.seed, 0.25)}
    assert val_ids, "the validation split must not be empty"
    assert its[1]["train"]["records"] == len(records) - len(val_ids)
    assert its[1]["train"]["available"] == len(records)
    assert metrics["final"]["records"] == len(records)  # the final student trains on everything

    fb = its[0]["feedback"]
    assert fb["validation"] > 0 and fb["candidates"] > 0 and fb["ids"]
    assert not set(fb["ids"]) & val_ids
    by_id = {r["id"]: r for r in records}
    counts = {lab: sum(by_id[i]["label"] == lab for i in fb["ids"]) for lab in SST2.label_names}
    assert max(counts.values()) <= cfg.strategy.feedback_pool_size // 2

    # Iteration 1's prompts show feedback examples of the label they ask for, never another label.
    texts = {by_id[i]["text"]: by_id[i]["label"] for i in fb["ids"]}
    shown = 0
    for p in engine.prompts:
        if not p.meta.get("uid", "").startswith("it1-"):
            continue
        body = "\n".join(m["content"] for m in p.messages or ())
        for text, lab in texts.items():
            if text in body:
                shown += 1
                assert lab == p.label
    assert shown > 0


def test_progen_settings_are_checked():
    with pytest.raises(ConfigError, match="progen_val_fraction"):
        load_config(None, ["strategy.progen_val_fraction=0.9"])
    with pytest.raises(ConfigError, match="progen_feedback_ratio"):
        load_config(None, ["strategy.progen_feedback_ratio=1.5"])


def test_progen_refuses_text_to_text_tasks(tmp_path, tiny_student):
    cfg = load_config(None, ["task.name=svamp", "task.eval_path=/nonexistent/eval.jsonl", "strategy.name=progen",
                             f"student.model={tiny_student}",
                             "teacher.model=fake", f"output.dir={tmp_path / 'run'}", "tracking.enabled=false"])
    with pytest.raises(ConfigError, match="progen needs a classification task"):
        Distiller(cfg, engine=FakeTeacherEngine())
    assert not (tmp_path / "run").exists(), "a refused run must leave nothing behind"
