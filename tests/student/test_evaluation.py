import json
import math
import os
import re
from pathlib import Path

import pytest

from gold_ray.config import ConfigError, TaskConfig
from gold_ray.run.tasks import DATA_DIR_ENV, TaskFileError, load_task
from gold_ray.student.evaluation import (
    accuracy,
    evaluate_student,
    evaluate_teacher_fewshot,
    exact_match,
    first_number,
    load_eval_records,
    load_task_eval,
    macro_f1,
    numeric_match,
    per_label_accuracy,
    read_jsonl,
    teacher_fewshot_predictions,
)
from gold_ray.testing import FakeTeacherEngine
from gold_ray.types import Prompt

SST2 = load_task("sst2")
MRPC = load_task("mrpc")
SVAMP = load_task("svamp")


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _data_dir() -> Path:
    base = os.environ.get(DATA_DIR_ENV)
    if not base:
        pytest.skip(f"${DATA_DIR_ENV} is not set")
    return Path(base)


class _FixedStudent:
    """Stands in for a Student: predicts with a plain function and counts predict calls."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = 0

    def predict(self, records):
        self.calls += 1
        return [self.fn(r) for r in records]


# ----- reading -------------------------------------------------------------------------------


def test_read_jsonl_skips_blank_lines(tmp_path):
    path = _write(tmp_path / "a.jsonl", '{"text": "x", "label": "positive"}\n\n  \n{"text": "y", "label": "negative"}\n')
    assert [r["text"] for r in read_jsonl(path)] == ["x", "y"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "x"}\n\n{"text": "y"\n', r"bad\.jsonl:3: not valid JSON"),
        ('{"text": "x"}\n[1, 2]\n', r"bad\.jsonl:2: expected a JSON object"),
        ("", r"bad\.jsonl: no records"),
        ("\n \n", r"bad\.jsonl: no records"),
        ('{"text": "caf\xe9"}\n'.encode("latin-1"), r"bad\.jsonl: not UTF-8"),
    ],
)
def test_read_jsonl_errors_name_file_and_line(tmp_path, content, message):
    with pytest.raises(ValueError, match=message):
        read_jsonl(_write(tmp_path / "bad.jsonl", content))


def test_load_eval_records_checks_fields_and_labels(tmp_path):
    path = _write(tmp_path / "p.jsonl", '{"text_a": "a", "text_b": "b", "label": "equivalent"}\n{"text_a": "a", "label": "equivalent"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: missing field 'text_b'"):
        load_eval_records(MRPC, path)
    path = _write(tmp_path / "s.jsonl", '{"text": "fine", "label": "positive"}\n{"text": "meh", "label": "neutral"}\n')
    with pytest.raises(ValueError, match=r"s\.jsonl:2: label 'neutral'"):
        load_eval_records(SST2, path)
    path = _write(tmp_path / "q.jsonl", '{"question": "1 plus 2?", "answer": 3}\n{"question": "half of 5?", "answer": 2.5}\n')
    records = load_eval_records(SVAMP, path)
    assert [r["answer"] for r in records] == ["3", "2.5"]


def test_a_file_bad_on_many_lines_names_them_all_at_once(tmp_path):
    good, no_label, odd = ('{"text": "fine", "label": "positive"}', '{"text": "meh"}',
                           '{"text": "meh", "label": "neutral"}')
    path = _write(tmp_path / "s.jsonl", "\n".join([good, no_label, good, odd, *[no_label] * 12]) + "\n")
    with pytest.raises(ValueError) as err:
        load_eval_records(SST2, path)
    assert re.search(r"s\.jsonl:2: missing field 'label' \(task 'sst2'\); 13 more lines with problems: "
                     r"4, 5, 6, 7, 8, 9, 10, 11, 12, 13, \.\.\.$", str(err.value)), str(err.value)


def test_load_eval_records_limit_draws_a_seeded_subset(tmp_path):
    lines = [json.dumps({"text": f"t{i}", "label": "negative" if i < 50 else "positive"}) for i in range(100)]
    path = _write(tmp_path / "sorted.jsonl", "\n".join(lines) + "\n")
    first = load_eval_records(SST2, path, limit=10, seed=None)
    assert [r["text"] for r in first] == [f"t{i}" for i in range(10)]
    sub = load_eval_records(SST2, path, limit=10)
    assert len(sub) == 10 and sub == load_eval_records(SST2, path, limit=10)
    idx = [int(r["text"][1:]) for r in sub]
    assert idx == sorted(idx) and idx != list(range(10))
    assert {r["label"] for r in sub} == {"negative", "positive"}
    assert len(load_eval_records(SST2, path, limit=500)) == 100


# ----- a task's evaluation set: config file, local mirror, datasets dataset, or none -----------

MY_TASK = """
name: mine
type: classification
description: Is the review good or bad?
input_fields: [{name: text, display: Review}]
labels:
  - {name: good, description: the reviewer liked it}
  - {name: bad, description: the reviewer did not}
seed_demos:
  - {text: "lovely stuff", label: good}
"""


def _my_task(tmp_path: Path, eval_yaml: str):
    return load_task(_write(tmp_path / "mine.yaml", MY_TASK + eval_yaml))


def _sentences_dataset(folder: Path, n: int = 6) -> Path:
    """A local ``datasets`` folder: a validation split with SST-2-like columns and integer classes."""
    folder.mkdir(parents=True)
    rows = [{"sentence": f"review {i}", "label": i % 2, "idx": i} for i in range(n)]
    _write(folder / "validation.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_task_eval_reads_the_local_mirror_first(tmp_path, hf_offline):
    mirror = tmp_path / "mirror"
    (mirror / "mine").mkdir(parents=True)
    _write(mirror / "mine" / "test.jsonl", '{"text": "from the mirror", "label": "good"}\n')
    folder = _sentences_dataset(tmp_path / "ds")
    task = _my_task(tmp_path, f"eval: {{path: mine/test.jsonl, hf: {{path: {folder}, split: validation, "
                              "fields: {text: sentence}, label_names: [bad, good]}}\n")
    got = load_task_eval(task, TaskConfig(name="mine", data_dir=str(mirror)))
    assert got.source == f"mirror:{(mirror / 'mine' / 'test.jsonl').absolute()}"
    assert [r["text"] for r in got.records] == ["from the mirror"]
    assert got.file == (mirror / "mine" / "test.jsonl").absolute()


def test_task_eval_reads_a_datasets_dataset_with_fields_and_labels_mapped(tmp_path, hf_offline):
    folder = _sentences_dataset(tmp_path / "ds")
    # The mirror is unset: the named dataset stands in for it.
    task = _my_task(tmp_path, f"eval: {{path: mine/test.jsonl, hf: {{path: {folder}, split: validation, "
                              "fields: {text: sentence}, label_names: [bad, good]}}\n")
    got = load_task_eval(task, TaskConfig(name="mine"))
    assert got.source == f"hf:{folder}:validation" and got.file is None
    assert got.records == [{"text": f"review {i}", "label": ["bad", "good"][i % 2]} for i in range(6)]
    assert "6 records" in got.note and "no data folder is set" in got.note
    # eval_limit keeps the same seeded subset as for a file.
    limited = load_task_eval(task, TaskConfig(name="mine", eval_limit=3))
    assert len(limited.records) == 3 and limited.records == load_task_eval(task, TaskConfig(name="mine", eval_limit=3)).records
    assert all(r in got.records for r in limited.records)


def test_task_eval_takes_class_names_from_a_classlabel_column(tmp_path, hf_offline):
    from datasets import ClassLabel, Dataset, Features, Value

    folder = tmp_path / "pq"
    folder.mkdir()
    features = Features({"review": Value("string"), "stars": ClassLabel(names=["bad", "good"])})
    Dataset.from_dict({"review": ["meh", "great"], "stars": [0, 1]}, features=features).to_parquet(
        folder / "test.parquet")
    task = _my_task(tmp_path, f"eval: {{hf: {{path: {folder}, split: test, fields: {{text: review, label: stars}}}}}}\n")
    got = load_task_eval(task, TaskConfig(name="mine"))
    assert got.records == [{"text": "meh", "label": "bad"}, {"text": "great", "label": "good"}]
    # The same names listed in another order would swap the classes: refused, naming the field.
    task = _my_task(tmp_path, f"eval: {{hf: {{path: {folder}, split: test, fields: {{text: review, label: stars}}, "
                              "label_names: [good, bad]}}\n")
    with pytest.raises(TaskFileError, match=r"eval\.hf\.label_names: .*out of their order"):
        load_task_eval(task, TaskConfig(name="mine"))


def test_task_eval_without_mirror_or_reachable_dataset_has_no_records_and_says_why(hf_offline):
    got = load_task_eval(SST2, TaskConfig(name="sst2"))
    assert got.records == [] and got.source == "none" and got.file is None
    assert "\n" not in got.note and "synthetic hold-out" in got.note
    assert "nyu-mll/glue/sst2:validation cannot be reached" in got.note and DATA_DIR_ENV in got.note
    # A task with no dataset to fall back on says so too.
    got = load_task_eval(SVAMP, TaskConfig(name="svamp"))
    assert got.source == "none" and "svamp/test.jsonl" in got.note


def test_task_eval_dataset_that_does_not_fit_the_task_names_the_field(tmp_path, hf_offline):
    folder = _sentences_dataset(tmp_path / "ds")
    task = _my_task(tmp_path, f"eval: {{hf: {{path: {folder}, split: validation, label_names: [bad, good]}}}}\n")
    with pytest.raises(TaskFileError, match=r"eval\.hf\.fields: .*no column\(s\) \['text'\]"):
        load_task_eval(task, TaskConfig(name="mine"))
    task = _my_task(tmp_path, f"eval: {{hf: {{path: {folder}, split: validation, fields: {{text: sentence}}}}}}\n")
    with pytest.raises(TaskFileError, match=r"eval\.hf\.label_names: .*integer class 0"):
        load_task_eval(task, TaskConfig(name="mine"))


def test_a_malformed_eval_hf_is_an_input_error_naming_the_field(tmp_path, hf_offline):
    from gold_ray.errors import UserError

    folder = _sentences_dataset(tmp_path / "ds")
    # Files on this machine that are not there: the user's mistake, not an unreachable Hub.
    cases = [
        (f"{{path: json, data_files: {tmp_path / 'gone.jsonl'}, split: train}}", r"eval\.hf\.data_files: cannot read"),
        (f"{{path: {tmp_path / 'no-folder'}, split: validation}}", r"eval\.hf\.path: cannot read"),
        (f"{{path: {folder}, split: nosuch, fields: {{text: sentence}}}}", r"eval\.hf: cannot load .*nosuch"),
    ]
    for spec, message in cases:
        task = _my_task(tmp_path, f"eval: {{hf: {spec}}}\n")
        with pytest.raises(TaskFileError, match=message) as caught:
            load_task_eval(task, TaskConfig(name="mine"))
        assert isinstance(caught.value, UserError)


def test_an_explicit_eval_file_that_cannot_be_read_is_an_error_naming_the_field(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(ConfigError, match=r"task\.eval_path: cannot read .*nope\.jsonl"):
        load_task_eval(SST2, TaskConfig(name="sst2", eval_path=str(tmp_path / "nope.jsonl")))
    bad = _write(tmp_path / "bad.jsonl", '{"text": "x", "label": "maybe"}\n')
    with pytest.raises(ConfigError, match=r"task\.eval_path: .*bad\.jsonl:1: label 'maybe'"):
        load_task_eval(SST2, TaskConfig(name="sst2", eval_path=str(bad)))
    with pytest.raises(ConfigError, match=r"task\.eval_path: .*no data folder is set"):
        load_task_eval(SST2, TaskConfig(name="sst2", eval_path="sst2/test.jsonl"))
    # The task's own absolute file is named by the user too: no fallback, an error.
    task = _my_task(tmp_path, f"eval: {{path: {tmp_path / 'gone.jsonl'}}}\n")
    with pytest.raises(TaskFileError, match=r"eval\.path: cannot read .*gone\.jsonl"):
        load_task_eval(task, TaskConfig(name="mine"))


# ----- metrics -------------------------------------------------------------------------------


def test_accuracy_macro_f1_and_per_label_by_hand():
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "c", "c"]
    assert accuracy(pred, gold) == pytest.approx(4 / 6)
    # F1: a = 2*2/(4+0+1) = 0.8; b = 2*1/(2+1+1) = 0.5; c = 2*1/(2+1+0) = 2/3
    assert macro_f1(pred, gold, ["a", "b", "c"]) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # A label never predicted and never gold counts as F1 0 in the average.
    assert macro_f1(pred, gold, ["a", "b", "c", "d"]) == pytest.approx((0.8 + 0.5 + 2 / 3) / 4)
    assert per_label_accuracy(pred, gold, ["a", "b", "c", "d"]) == {"a": 2 / 3, "b": 0.5, "c": 1.0}
    assert math.isnan(accuracy([], []))
    with pytest.raises(ValueError, match="2 predictions for 1"):
        accuracy(["a", "b"], ["a"])


def test_exact_and_numeric_match():
    assert exact_match(["  The Cat.", "dog", "cat"], ["the cat", "Dog", "cats"]) == pytest.approx(2 / 3)
    assert first_number("it costs $1,250.50 today") == 1250.5
    assert first_number("minus -3 then 4") == -3
    assert first_number("no digits") is None
    pred = ["The answer is 42.", "19.0", "about 7", "none", "0.3333333"]
    gold = ["42", "19", "8", "5", "0.3333334"]
    assert numeric_match(pred, gold) == pytest.approx(3 / 5)  # 0.3333333 is within 1e-6
    assert numeric_match(["0.33333"], ["0.3333334"]) == 0.0


# ----- evaluating ----------------------------------------------------------------------------


def test_evaluate_student_classification_metrics_and_batching():
    records = [{"text": t, "label": g} for t, g in [("good", "positive"), ("bad", "negative"), ("meh", "negative")]]
    student = _FixedStudent(lambda r: "positive" if r["text"] in ("good", "meh") else "negative")
    metrics = evaluate_student(student, SST2, records, batch_size=2)
    assert student.calls == 2
    assert metrics["n"] == 3
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    # positive F1 = 2/(2+1) ; negative F1 = 2/(2+0+1)
    assert metrics["macro_f1"] == pytest.approx(2 / 3)
    assert metrics["per_label_accuracy"] == {"negative": 0.5, "positive": 1.0}


def test_evaluate_student_text_to_text_metrics():
    records = [{"question": "q1", "answer": "12"}, {"question": "q2", "answer": "7"}]
    metrics = evaluate_student(_FixedStudent(lambda r: "12" if r["question"] == "q1" else "7 apples"), SVAMP, records)
    assert metrics == {"exact_match": 0.5, "numeric_match": 1.0, "n": 2}


def test_evaluate_on_real_sst2():
    records = load_eval_records(SST2, _data_dir() / "sst2" / "test.jsonl")
    assert len(records) == 872
    metrics = evaluate_student(_FixedStudent(lambda r: "positive"), SST2, records)
    assert metrics["accuracy"] == pytest.approx(444 / 872)
    assert metrics["macro_f1"] == pytest.approx((2 * 444 / (2 * 444 + 428)) / 2)
    assert metrics["per_label_accuracy"] == {"negative": 0.0, "positive": 1.0}


def test_real_svamp_answers_become_strings():
    records = load_eval_records(SVAMP, _data_dir() / "svamp" / "test.jsonl", limit=50, seed=None)
    assert records[0]["answer"] == "51"
    assert all(isinstance(r["answer"], str) and first_number(r["answer"]) is not None for r in records)


# ----- the teacher as a classifier -----------------------------------------------------------


def _render(record: dict) -> Prompt:
    fields = "\n".join(f"{k}: {v}" for k, v in record.items() if k not in ("label", "answer"))
    return Prompt(kind="classify", label=None, text=f"{fields}\nLabel:")


def test_teacher_fewshot_classification_picks_best_verbalizer():
    records = [
        {"text": "clearly positive stuff", "label": "positive"},
        {"text": "so negative", "label": "negative"},
        {"text": "negative, they said", "label": "positive"},
    ]
    pred = teacher_fewshot_predictions(FakeTeacherEngine(), [_render(r) for r in records], SST2)
    assert pred == ["positive", "negative", "negative"]
    metrics = evaluate_teacher_fewshot(FakeTeacherEngine(), SST2, records, _render)
    assert metrics["accuracy"] == pytest.approx(2 / 3) and metrics["unanswered"] == 0


def test_teacher_fewshot_uses_verbalizer_words_and_handles_unscored_rows():
    class ScriptedEngine(FakeTeacherEngine):
        def __init__(self, row):
            super().__init__()
            self.row = row

        def option_logprobs(self, prompts, options):
            self.options = options
            return [list(self.row) for _ in prompts]

    record = {"text_a": "x", "text_b": "y", "label": "not_equivalent"}
    engine = ScriptedEngine([-2.0, -0.1])
    assert teacher_fewshot_predictions(engine, [_render(record)], MRPC) == ["not_equivalent"]
    # MRPC's not_equivalent is verbalised "not equivalent": the engine scores the words.
    assert engine.options == ["equivalent", "not equivalent"]
    assert teacher_fewshot_predictions(ScriptedEngine([math.nan, -0.5]), [_render(record)], MRPC) == ["not_equivalent"]
    engine = ScriptedEngine([math.nan, math.nan])
    metrics = evaluate_teacher_fewshot(engine, MRPC, [record], _render)
    assert metrics["unanswered"] == 1 and metrics["accuracy"] == 0.0


def test_teacher_fewshot_text_to_text_takes_first_number():
    records = [{"question": f"q{i}", "answer": a} for i, a in enumerate(["42", "3", "2.5", "8"])]
    engine = FakeTeacherEngine(script=["The answer is 42 apples", "no idea", " 2.50\nmore", "8"], fail_every=4)
    pred = teacher_fewshot_predictions(engine, [_render(r) for r in records], SVAMP)
    assert pred == ["42", "", "2.5", ""]  # the 4th call fails: an error is never an answer
    engine = FakeTeacherEngine(script=["The answer is 42 apples", "no idea", " 2.50\nmore", "8"])
    metrics = evaluate_teacher_fewshot(engine, SVAMP, records, _render)
    assert metrics == {"exact_match": 0.75, "numeric_match": 0.75, "n": 4, "unanswered": 1}
