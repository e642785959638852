"""A newcomer follows only the README's "Distill your own task" to distill a task of their own.

The test takes the task file and the commands from the README itself (so the README cannot drift
from what works), runs them as written through the installed ``gold-ray`` script, with only tiny
random models and a tiny budget added to the distillation (``--local``: the in-process loop; the
same command on Ray is the README demo test). Then it reads the report (in headless Chromium when
installed) and loads the student with the README's plain-transformers snippet.
"""

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gold_ray.run.tasks import shipped_tasks

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GOLD_RAY = str(Path(sys.executable).parent / "gold-ray")
# A newcomer's shell: without the test suite's fault hook, whose module only imports from the checkout.
NEWCOMER_ENV = {k: v for k, v in os.environ.items() if not k.startswith("GOLD_RAY_FAULT")}


def section(heading: str) -> str:
    text = README.read_text()
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_a_newcomer_distills_their_own_task_by_the_readme(tmp_path):
    from gold_ray.testing import save_tiny_chat_lm, save_tiny_classifier

    own = section("## Distill your own task")
    task_yaml = re.search(r"```yaml\n(.*?)```", own, flags=re.S).group(1)
    task = yaml.safe_load(task_yaml)
    assert task["name"] not in shipped_tasks(), "the README's example must be a task of the user's own"
    assert len(task["labels"]) == 2
    (tmp_path / "my_task.yaml").write_text(task_yaml)
    commands = [c for c in re.search(r"Save it as `my_task.yaml`.*?```bash\n(.*?)```", own, flags=re.S)
                .group(1).splitlines() if c.strip()]
    assert [shlex.split(c)[1] for c in commands] == ["tasks", "config", "distill", "predict"]

    teacher = save_tiny_chat_lm(tmp_path / "models" / "teacher")
    student = save_tiny_classifier(tmp_path / "models" / "student")
    tiny = ["--local", "--set", f"teacher.model={teacher}", "--set", f"student.model={student}",
            "--set", "budget.samples=12", "--set", "strategy.iterations=2", "--set", "strategy.probe_fraction=0.5",
            "--set", "teacher.max_new_tokens=16", "--set", "student.final_epochs=1"]
    outputs = []
    for command in commands:
        args = shlex.split(command.split("  #")[0])
        assert args[0] == ".venv/bin/gold-ray"
        args[0] = GOLD_RAY
        if args[1] == "distill":
            args += tiny
        proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=1200, env=NEWCOMER_ENV)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout)
    validate, config, distill, predict = outputs

    assert "ok my_task.yaml: task support_tickets" in validate
    assert "name: my_task.yaml" in config
    # Not a terminal here: one plain line per stage, then where the outputs are.
    for it in (1, 2):
        for stage in ("generate", "train", "probe", "feedback"):
            assert len(re.findall(rf"iteration {it}/2 {stage}\b", distill)) == 1, distill
    assert "final stage" in distill and "report:" in distill

    run = tmp_path / "runs" / "mine"
    page = (run / "report.html").read_text()
    assert "gold-ray report: support_tickets" in page
    assert page.count('src="data:image/png;base64,') == 4
    assert "No real evaluation set: per-iteration values are on a synthetic hold-out" in page
    metrics = json.loads((run / "metrics.json").read_text())
    assert all("holdout_accuracy" in m["probe"] for m in metrics["iterations"])

    [row] = [json.loads(line) for line in predict.splitlines()]
    assert row["prediction"] in ("billing", "technical")
    assert set(row["probabilities"]) == {"billing", "technical"}

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:  # the report opens in a browser with no server
        dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              "--disable-background-networking", "--disable-component-update", "--disable-sync",
                              "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                              (run / "report.html").as_uri()], capture_output=True, text=True, timeout=180,
                             check=True).stdout
        assert dom.count('<img class="plot"') == 4 and "<h2>Samples</h2>" in dom

    # The README's plain-transformers snippet loads the exported student.
    code = re.search(r"```python\n(.*?)```", section("## Use the student"), flags=re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.replace("runs/demo/student", str(run / "student")), "README.md", "exec"), {})
    assert out.getvalue().split()[0] in ("billing", "technical")


def test_the_demo_with_no_data_folder_and_no_network_evaluates_on_a_synthetic_hold_out_and_says_so(
        tmp_path, tiny_chat_lm, tiny_student):
    """The shipped ``demo`` config (shrunk, tiny models) where ``$GOLD_RAY_DATA`` is unset and the
    SST-2 dataset it names cannot be reached (``datasets`` offline, an empty cache): the run
    completes, evaluates on a synthetic hold-out, says why in one line, and marks the figures."""
    env = {k: v for k, v in NEWCOMER_ENV.items() if k != "GOLD_RAY_DATA"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"))
    out = tmp_path / "runs" / "demo"
    proc = subprocess.run(
        [GOLD_RAY, "distill", "demo", "--local", "--output", str(out), "--set", f"teacher.model={tiny_chat_lm}",
         "--set", f"student.model={tiny_student}", "--set", "budget.samples=16", "--set", "strategy.iterations=1",
         "--set", "teacher.max_new_tokens=16", "--set", "student.final_epochs=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    why = [line for line in text.splitlines() if "has no real evaluation set here" in line]
    assert len(why) == 1 and "nyu-mll/glue/sst2:validation cannot be reached" in why[0], text[-3000:]
    assert "on a synthetic hold-out (no real evaluation set" in text

    final = json.loads((out / "metrics.json").read_text())["final"]
    # Kept apart from real-data figures: synthetic_* keys, never "accuracy".
    assert final["eval_source"] == "none" and "accuracy" not in final and "synthetic_accuracy" in final
    assert final["baselines"]["on"] == "synthetic hold-out" and final["synthetic_n"] == final["baselines"]["n"] > 0
    assert "No real evaluation set: per-iteration values are on a synthetic hold-out" in (
        out / "report.html").read_text()
