"""``gold-ray`` errors by kind: bad input exits 2 with one line naming the field; a bug exits 1 and keeps its traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import gold_ray.run.loop
from gold_ray.cli import main
from gold_ray.config import RunConfig
from gold_ray.run.tasks import SHIPPED_TASK_DIR

INTERNAL = "gold-ray: internal error (this is a bug; please report it):"


def _broken_strategy_table(name: str):
    # Not user input: the name was validated by the config; a lookup deep in the loop fails.
    raise ValueError(f"strategy table has no entry {name!r}")


def distill(run: Path, *args: str) -> list[str]:
    return ["distill", "tiny", "--local", "--quiet", "--output", str(run), *args]


def test_an_internal_error_exits_1_and_writes_its_traceback_to_the_run_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gold_ray.run.loop, "build_strategy", _broken_strategy_table)
    run = tmp_path / "run"
    assert main(distill(run)) == 1
    err = capsys.readouterr().err
    assert f"{INTERNAL} ValueError: strategy table has no entry 'gold'" in err
    log = run / "logs" / "gold-ray.log"
    assert f"the full traceback is in {log}" in err
    assert "Traceback" not in err
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "_broken_strategy_table" in text
    assert "distill tiny --local" in text  # the command that failed


@pytest.mark.parametrize("where", ["before the command", "after the command"])
def test_debug_prints_the_traceback_of_an_internal_error(tmp_path, monkeypatch, capsys, where):
    monkeypatch.setattr(gold_ray.run.loop, "build_strategy", _broken_strategy_table)
    args = distill(tmp_path / "run")
    args = ["--debug", *args] if where == "before the command" else [*args, "--debug"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert INTERNAL in err
    assert "Traceback (most recent call last)" in err and "_broken_strategy_table" in err


def test_an_internal_error_without_a_run_directory_says_how_to_see_the_traceback(monkeypatch, capsys):
    def broken(self: RunConfig) -> str:
        raise KeyError("teacher")

    monkeypatch.setattr(RunConfig, "to_yaml", broken)
    assert main(["config", "show", "tiny"]) == 1
    err = capsys.readouterr().err
    assert f"{INTERNAL} KeyError: 'teacher'" in err
    assert "run it again with --debug" in err and "Traceback" not in err


def test_a_bad_config_key_exits_2_naming_the_key_without_a_traceback(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--debug", *distill(run, "--set", "budget.samplez=3")]) == 2
    err = capsys.readouterr().err
    assert "gold-ray: error:" in err and "budget.samplez: Extra inputs are not permitted" in err
    assert "Traceback" not in err and "internal error" not in err
    assert not run.exists()


def test_a_bad_task_field_exits_2_naming_the_field_without_a_traceback(tmp_path, capsys):
    data = yaml.safe_load((SHIPPED_TASK_DIR / "sst2.yaml").read_text())
    data["seed_demos"][0]["label"] = "neutral"
    task = tmp_path / "my_task.yaml"
    task.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    assert main(["--debug", *distill(run, "--set", f"task.name={task}")]) == 2
    err = capsys.readouterr().err
    assert "gold-ray: error:" in err and str(task) in err and "seed_demos[0].label: 'neutral'" in err
    assert "Traceback" not in err and "internal error" not in err
    assert not (run / "logs").exists()



def _own_task(tmp_path: Path) -> Path:
    # SST-2's task as a user's own, with its evaluation and seed files beside it.
    data = yaml.safe_load((SHIPPED_TASK_DIR / "sst2.yaml").read_text())
    data.update(eval={"path": "test.jsonl"}, seed_path="seed.jsonl")
    task = tmp_path / "my_task.yaml"
    task.write_text(yaml.safe_dump(data))
    (tmp_path / "test.jsonl").write_text('{"text": "a fine film", "label": "positive"}\n\n'
                                         '{"text": "dull", "label": "negative"}\n')
    (tmp_path / "seed.jsonl").write_text('{"text": "great", "label": "positive"}\n')
    return task


def test_tasks_validate_reads_the_files_the_task_names(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GOLD_RAY_DATA", raising=False)
    task = _own_task(tmp_path)
    assert main(["tasks", "validate", str(task)]) == 0
    out = capsys.readouterr().out
    assert f"eval: 2 records of {tmp_path / 'test.jsonl'}" in out
    assert f"seed_path: 1 labelled records of {tmp_path / 'seed.jsonl'}" in out



@pytest.mark.parametrize(("file", "text", "expected"), [
    ("test.jsonl", '{"text": "ok", "label": "positive"}\n\n{"text": "meh", "label": "neutral"}\n',
     r"eval\.path: .*test\.jsonl:3: label 'neutral' is not one of"),
    ("test.jsonl", '{"text": "ok", "label": "positive"}\nnot json\n', r"eval\.path: .*test\.jsonl:2: not valid JSON"),
    ("seed.jsonl", '{"text": "ok"}\n{"sentence": "no text"}\n', r"seed_path: .*seed\.jsonl:2: missing or empty field 'text'"),
    ("seed.jsonl", '{"text": ""}\n', r"seed_path: .*seed\.jsonl:1: missing or empty field 'text'"),
])
def test_tasks_validate_names_the_line_of_a_bad_data_file(tmp_path, capsys, file, text, expected):
    task = _own_task(tmp_path)
    (tmp_path / file).write_text(text)
    assert main(["tasks", "validate", str(task)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"INVALID {task}: ") and re.search(expected, err), err


def test_tasks_validate_says_what_s3_would_refuse_in_a_seed_file_llkd_can_read(tmp_path, capsys):
    task = _own_task(tmp_path)
    (tmp_path / "seed.jsonl").write_text('{"text": "ok", "label": "positive"}\n{"text": "no label"}\n')
    assert main(["tasks", "validate", str(task)]) == 0
    captured = capsys.readouterr()
    assert "seed_path: 2 records of" in captured.out
    assert re.search(r"warning: seed_path: LLKD can read it as its pool; S3 would refuse it: .*seed\.jsonl:2: "
                     r"missing field 'label'", captured.err), captured.err


def test_tasks_validate_refuses_an_unreadable_file_as_bad_input(tmp_path, capsys):
    task = _own_task(tmp_path)
    data = yaml.safe_load(task.read_text())
    (tmp_path / "tests").mkdir()  # a folder where the file should be
    task.write_text(yaml.safe_dump({**data, "eval": {"path": str(tmp_path / "tests")}}))
    assert main(["tasks", "validate", str(task)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"INVALID .*: eval\.path: .*tests: cannot read it", err), err
    assert "internal error" not in err


def test_tasks_validate_warns_when_the_seed_file_is_the_evaluation_file(tmp_path, capsys):
    task = _own_task(tmp_path)
    data = yaml.safe_load(task.read_text())
    task.write_text(yaml.safe_dump({**data, "seed_path": "test.jsonl"}))
    assert main(["tasks", "validate", str(task)]) == 0
    assert "is the evaluation file; S3 and LLKD refuse it" in capsys.readouterr().err


def test_tasks_validate_warns_about_a_label_without_a_seed_demo(tmp_path, capsys):
    task = _own_task(tmp_path)
    data = yaml.safe_load(task.read_text())
    task.write_text(yaml.safe_dump({**data, "seed_demos": [d for d in data["seed_demos"] if d["label"] == "positive"]}))
    assert main(["tasks", "validate", str(task)]) == 0
    assert "warning: seed_demos: none of label 'negative'" in capsys.readouterr().err
    _own_task(tmp_path)
    assert main(["tasks", "validate", str(task)]) == 0
    assert "seed_demos" not in capsys.readouterr().err


def test_tasks_validate_warns_about_a_seed_file_it_cannot_find(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GOLD_RAY_DATA", raising=False)
    task = _own_task(tmp_path)
    (tmp_path / "seed.jsonl").unlink()
    assert main(["tasks", "validate", str(task)]) == 0  # only S3 and LLKD need it
    captured = capsys.readouterr()
    assert "ok " in captured.out
    assert f"warning: seed_path: {str(tmp_path / 'seed.jsonl')!r} does not exist, and 'seed.jsonl' is relative" \
        in captured.err


@pytest.mark.parametrize("data_folder", [False, True])
def test_an_own_task_whose_evaluation_file_is_nowhere_is_refused(tmp_path, capsys, monkeypatch, data_folder):
    # A typo in the file's name must not become a run scored on synthetic data.
    if data_folder:
        monkeypatch.setenv("GOLD_RAY_DATA", str(tmp_path / "mirror"))
    else:
        monkeypatch.delenv("GOLD_RAY_DATA", raising=False)
    task = _own_task(tmp_path)
    (tmp_path / "test.jsonl").unlink()
    assert main(["tasks", "validate", str(task)]) == 2
    err = capsys.readouterr().err
    assert f"INVALID {task}: eval.path: 'test.jsonl' is not beside the task file ({str(tmp_path / 'test.jsonl')!r} " \
           "does not exist), and " in err
    assert ("holds no 'test.jsonl'" if data_folder else "no data folder is set") in err
    assert main(["distill", "demo", "--local", "--set", f"task.name={task}", "--output", str(tmp_path / "run")]) == 2
    assert "eval.path: 'test.jsonl' is not beside the task file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_config_show_checks_the_task_it_names(tmp_path, capsys):
    data = yaml.safe_load((SHIPPED_TASK_DIR / "sst2.yaml").read_text())
    data["labels"][0]["nmae"] = "typo"
    task = tmp_path / "my_task.yaml"
    task.write_text(yaml.safe_dump(data))
    assert main(["config", "show", "demo", "--set", f"task.name={task}"]) == 2
    err = capsys.readouterr().err
    assert str(task) in err and "labels.0.nmae" in err and "Traceback" not in err
    assert main(["config", "show", "demo", "--set", "task.name=sst2"]) == 0
    assert "name: sst2" in capsys.readouterr().out


def test_the_start_line_names_a_task_read_from_a_file_by_its_own_name_and_the_file(tmp_path):
    from gold_ray.cli import _task_words
    from gold_ray.config import load_config

    task = _own_task(tmp_path)  # SST-2's spec: its name is sst2
    assert _task_words(load_config(None, [f"task.name={task}"])) == f"sst2 ({task})"
    assert _task_words(load_config(None, ["task.name=sst2"])) == "sst2"
