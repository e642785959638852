"""``gold-ray predict``: texts or a JSONL file in, one JSON line per input out; bad lines named by number.
The README's plain-transformers snippet loads the same student and agrees with it."""

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from gold_ray.cli import main
from gold_ray.config import load_config
from gold_ray.run.loop import write_task_copy
from gold_ray.run.rundir import RunReadError
from gold_ray.run.tasks import load_task
from gold_ray.student.model import ClassifierStudent
from gold_ray.student.predict import load_run_student, predict, text_record
from gold_ray.testing import save_tiny_classifier

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as a finished run leaves it: config, task copy and the final student."""
    root = tmp_path_factory.mktemp("predict-run")
    base = save_tiny_classifier(root / "base", seed=3)
    task = load_task("sst2")
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(load_config(None, [f"output.dir={run}"]).to_yaml())
    write_task_copy(run, task)
    ClassifierStudent(task, base, device="cpu", seed=3).save(run / "student")
    return run


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_predict_texts(run_dir, capsys):
    assert main(["predict", str(run_dir), "a lovely film", "a dull, tedious mess"]) == 0
    rows = jsonl(capsys.readouterr().out)
    assert [r["text"] for r in rows] == ["a lovely film", "a dull, tedious mess"]
    for r in rows:
        assert set(r["probabilities"]) == {"negative", "positive"}
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert r["prediction"] == max(r["probabilities"], key=r["probabilities"].get)


@pytest.mark.slow  # a process of its own, importing torch and transformers
def test_predict_as_a_command_prints_predictions_and_no_library_progress_bars(run_dir):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "gold_ray.cli", "predict", str(run_dir), "a lovely film"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["text"] for r in jsonl(proc.stdout)] == ["a lovely film"]
    assert "Loading weights" not in proc.stderr, proc.stderr[-500:]


def test_predict_file_keeps_the_input_and_writes_the_output_file(run_dir, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 7, "text": "a lovely film"}\n\n{"id": 8, "text": "boring"}\n')
    out = tmp_path / "out.jsonl"
    assert main(["predict", str(run_dir), "--file", str(src), "--output", str(out)]) == 0
    assert "2 predictions written" in capsys.readouterr().err
    rows = jsonl(out.read_text())
    assert [r["id"] for r in rows] == [7, 8] and all(r["prediction"] in ("negative", "positive") for r in rows)


@pytest.mark.parametrize(("lines", "message"), [
    (['{"text": "fine"}', '{"text": "also fine"}', '{"text": "broken'], r"in\.jsonl:3: not valid JSON"),
    (['{"text": "fine"}', '{"txt": "typo"}'], r"in\.jsonl:2: missing input field 'text'"),
    (['{"text": "fine"}', '["a", "list"]'], r"in\.jsonl:2: expected a JSON object"),
    (['{"text": {"nested": 1}}'], r"in\.jsonl:1: field 'text' must be a string"),
])
def test_a_bad_line_is_named_and_nothing_is_written(run_dir, tmp_path, capsys, lines, message):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["predict", str(run_dir), "--file", str(src), "--output", str(out)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_clear_errors_for_wrong_use(run_dir, tmp_path, capsys):
    assert main(["predict", str(run_dir)]) == 2
    assert "give either texts or --file" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    assert main(["predict", str(tmp_path), "text"]) == 2
    assert "has not finished" in capsys.readouterr().err
    with pytest.raises(ValueError, match="input fields text_a, text_b: pass them as JSON lines with --file"):
        text_record(load_task("rte"), "just one text")


def readme_python_block(heading: str) -> str:
    section = README.read_text().split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_readme_transformers_snippet_loads_the_student_and_agrees_with_predict(run_dir):
    code = readme_python_block("## Use the student")
    assert 'student = "runs/demo/student"' in code and "gold_ray" not in code
    code = code.replace("runs/demo/student", str(run_dir / "student"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    label, probs = re.fullmatch(r"(\w+) (\[.*\])\n", out.getvalue()).groups()

    text = re.search(r'tokenizer\(\["([^"]+)"\]', code).group(1)
    student, task = load_run_student(run_dir)
    [row] = list(predict(student, task, [{"text": text}]))
    assert label == row["prediction"]
    assert json.loads(probs) == pytest.approx([row["probabilities"][k] for k in task.label_names], abs=1e-5)


def test_missing_run_directory(tmp_path):
    with pytest.raises(RunReadError, match="no such run directory"):
        load_run_student(tmp_path / "nope")
