"""Every command in the README is exercised by a test or by CI.

:data:`COVERAGE` maps each README command (a regular expression) to where it runs: a test file and a
string that file must contain (the test's name, or the command it runs). A README command that
matches no entry fails :func:`test_every_readme_command_is_exercised`, so a new command in the README
needs a test before it can land. The cheap commands run here; the MLflow UI command runs against a
real store (slow).
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

COVERAGE: list[tuple[str, list[tuple[str, str]]]] = [
    (r"make demo", [("tests/test_e2e.py", "def test_readme_demo_on_ray_reduced")]),
    (r"make test", [(".ci/run", "make test"), ("tests/test_package.py", "def test_ci_runs_the_readme_test_command")]),
    (r"make (test-fast|lint)", [("tests/test_readme.py", "def test_makefile_targets_of_the_readme")]),
    (r"make test-vllm", [(".ci/run", "make test-vllm"), ("Makefile", "tests/teacher/test_vllm_engine.py")]),
    (r"make test-gpu", [("Makefile", "pytest -m gpu tests/gpu"),
                        ("tests/gpu/test_cuda.py", "def test_a_whole_run_uses_the_gpu_and_its_student_loads_on_cpu")]),
    (r"\.venv/bin/gold-ray report \S+( \S+)?",
     [("tests/reporting/test_report.py", "def test_cli_rebuilds_a_report_and_compares_two_runs")]),
    (r'\.venv/bin/gold-ray predict runs/demo ".+"', [("tests/student/test_predict.py", "def test_predict_texts")]),
    (r"\.venv/bin/gold-ray predict \S+ --file \S+ --output \S+",
     [("tests/student/test_predict.py", "def test_predict_file_keeps_the_input_and_writes_the_output_file")]),
    # The "Distill your own task" block runs as written (tiny models added) in the newcomer test.
    (r"\.venv/bin/gold-ray (tasks validate|config show demo|distill demo|predict runs/mine) .+",
     [("tests/test_newcomer.py", "def test_a_newcomer_distills_their_own_task_by_the_readme")]),
    (r"(\.venv/bin/)?ray start --head .+", [("tests/jobs/test_submit.py", "def ray_head")]),
    (r"\.venv/bin/ray stop", [("tests/jobs/test_submit.py", "def ray_head")]),
    (r"\.venv/bin/gold-ray submit tiny --address \S+ --follow",
     [("tests/jobs/test_submit.py", "def test_a_job_whose_driver_is_killed_resumes_when_resubmitted")]),
    (r"\.venv/bin/gold-ray jobs status JOB_ID --address \S+",
     [("tests/jobs/test_submit.py", "def test_a_job_whose_driver_is_killed_resumes_when_resubmitted")]),
    (r"\. \.venv/bin/activate", [("tests/jobs/test_submit.py", "activate")]),
    (r"(\w+=\S+ )*ray job submit .+", [("tests/jobs/test_submit.py", "ray job submit")]),
    # No Docker or Kubernetes in CI: the files these commands use are validated instead.
    (r"docker (build|push) .+", [("tests/test_cluster.py", "def test_dockerfile_installs_the_gpu_extra_and_the_project_home")]),
    (r"kubectl apply -f .+", [("tests/test_cluster.py", "def test_kuberay_manifests_use_the_ray_io_v1_api"),
                              ("tests/test_cluster.py", "def test_rayjob_runs_once_and_cleans_up_and_reaches_mlflow")]),
    (r"kubectl port-forward svc/\S+ 8265:8265 &", [("tests/test_readme.py", "def test_kubectl_names_match_the_manifests")]),
    (r"gold-ray submit cluster/configs/gpu\.yaml .+",
     [("tests/test_cluster.py", "def test_every_config_path_exists_and_validates"),
      ("tests/jobs/test_submit.py", "def test_forwarded_environment_is_the_named_variables_only")]),
    (r"\.venv/bin/mlflow ui --backend-store-uri \S+ --port \d+ --workers 1", [("tests/test_readme.py", "def test_mlflow_ui_command")]),
]


def readme_commands(text: str | None = None) -> list[str]:
    """Every command line of the README's ``bash`` blocks (continuations joined, comments dropped)."""
    text = text if text is not None else README.read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\s*\\\n\s*", " ", block).splitlines():
            line = re.split(r"\s+#\s", line.strip(), maxsplit=1)[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def test_command_extraction():
    text = "```bash\nmake a   # note\n# only a comment\ngold-ray x \\\n    --y z\n```\n```python\nnot_a_command()\n```"
    assert readme_commands(text) == ["make a", "gold-ray x --y z"]


def test_every_readme_command_is_exercised():
    commands = readme_commands()
    assert len(commands) > 15
    missing = [c for c in commands if not any(re.fullmatch(p, c) for p, _ in COVERAGE)]
    assert not missing, f"README commands no test exercises (add a test and a COVERAGE entry): {missing}"
    for _, refs in COVERAGE:
        for path, needle in refs:
            assert needle in (ROOT / path).read_text(), f"{path} no longer holds {needle!r}"


def test_files_named_by_readme_commands_exist():
    for command in readme_commands():
        for token in command.split():
            token = token.split("=", 1)[-1]
            if token.startswith(("cluster/", "benchmarks/")):
                assert (ROOT / token).exists(), f"README command {command!r} names a missing file {token}"


def test_kubectl_names_match_the_manifests():
    command = next(c for c in readme_commands() if c.startswith("kubectl port-forward"))
    service = re.search(r"svc/(\S+)", command).group(1)
    cluster = yaml.safe_load((ROOT / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    # KubeRay names a cluster's head service <cluster name>-head-svc.
    assert service == f"{cluster['metadata']['name']}-head-svc"


def test_makefile_targets_of_the_readme():
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    out = subprocess.run([make, "-n", "test-fast", "lint"], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "MAKEFLAGS": ""}).stdout
    assert '-m "not slow and not ray"' in out and "ruff check" in out
    assert "-n auto" in out and "OMP_NUM_THREADS=1" in out  # one worker per core, one torch thread each


def test_cli_knows_every_readme_subcommand_and_flag(capsys):
    from gold_ray.cli import build_parser

    parser = build_parser()
    nested = {"tasks", "config", "models", "jobs"}
    for command in readme_commands():
        words = command.split()
        if not words[0].endswith("gold-ray"):
            continue
        path = words[1:3] if words[1] in nested else words[1:2]
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([*path, "--help"])
        assert exit_info.value.code == 0, command
        usage = capsys.readouterr().out
        for flag in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
            assert flag in usage, f"README uses {flag} with gold-ray {' '.join(path)}, which does not take it"
    # Flags the README's prose names for gold-ray distill.
    with pytest.raises(SystemExit):
        parser.parse_args(["distill", "--help"])
    usage = capsys.readouterr().out
    text = README.read_text()
    for flag in ("--quiet", "--json-logs", "--resume", "--overwrite", "--local"):
        assert f"`{flag}`" in text and flag in usage


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_ui_command(tmp_path, monkeypatch):
    """The README's ``mlflow ui`` command, on a run store written by gold-ray's tracker, serves the run."""
    import json

    from gold_ray.config import load_config
    from gold_ray.reporting.tracking import build_tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "runs" / "demo"
    run_dir.mkdir(parents=True)
    cfg = load_config(None, [f"output.dir={run_dir}"])
    tracker = build_tracker(cfg, run_dir)
    run_id = tracker.start("gold-sst2-seed0")
    tracker.log_metrics({"generate.accepted": 12}, step=0)
    tracker.end("FINISHED")

    command = next(c for c in readme_commands() if c.startswith(".venv/bin/mlflow ui"))
    port = _free_port()
    args = command.split()
    args[0] = str(Path(sys.executable).parent / "mlflow")
    args[args.index("--port") + 1] = str(port)
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/runs/search"
        body = json.dumps({"experiment_ids": [tracker.client.get_run(run_id).info.experiment_id]}).encode()
        deadline, last = time.monotonic() + 300, None
        while time.monotonic() < deadline:
            try:
                req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=5) as resp:
                    runs = json.loads(resp.read())["runs"]
                break
            except OSError as err:
                last = err
                assert proc.poll() is None, proc.stdout.read()[-3000:]
                time.sleep(1)
        else:
            pytest.fail(f"mlflow ui did not answer on port {port}: {last}")
        assert [r["info"]["run_id"] for r in runs] == [run_id]
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
