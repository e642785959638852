"""Submitting a distillation as a Ray job: the submission built, and real jobs on a local Ray head.

The fast tests check what ``build_submission`` sends. The ``ray``/``slow`` tests start a real
Ray head with ``ray start`` (its own ports and temp dir, so other Ray clusters on the machine are
untouched), submit with the ``gold-ray submit`` console script and with the README's plain
``ray job submit`` command, and read what the jobs left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gold_ray.reporting.logs import worker_env
from gold_ray.run.store import read_parts
from gold_ray.testing import save_tiny_chat_lm, save_tiny_classifier
from jobs import submit as sub
from tests.raykit import free_port, kill_marked

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


# ---- build_submission (no Ray) -----------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    for name in (*sub.FORWARDED_ENV, "OPENAI_API_KEY", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def parse_entrypoint(entrypoint: str) -> tuple[str, dict[str, list[str]]]:
    words = shlex.split(entrypoint)
    assert words[1:3] == ["-m", "jobs.distill"]
    opts: dict[str, list[str]] = {}
    key = None
    for word in words[3:]:
        if word.startswith("--"):
            key = word
            opts.setdefault(key, [])
        else:
            assert key is not None
            opts[key].append(word)
    return words[0], opts


def test_local_cluster_uses_this_interpreter_and_uploads_the_project(tmp_path, clean_env):
    project = tmp_path / "project"
    (project / "cfg").mkdir(parents=True)
    (project / "cfg" / "run.yaml").write_text("output: {dir: /abs/run}\n")
    entrypoint, env = sub.build_submission("cfg/run.yaml", "http://127.0.0.1:8265", working_dir=project,
                                           overrides=["budget.samples=8"])
    python, opts = parse_entrypoint(entrypoint)
    assert python == sys.executable
    assert opts["--config"] == ["cfg/run.yaml"]  # relative to the uploaded working dir
    assert opts["--set"] == ["budget.samples=8"]
    assert env["working_dir"] == str(project.resolve())
    assert {".venv", "runs", ".cache", ".git"} <= set(env["excludes"])
    assert "pip" not in env and "image_uri" not in env


def test_remote_cluster_uses_python_from_path_and_pip(tmp_path, clean_env):
    (tmp_path / "run.yaml").write_text("output: {dir: /abs/run}\n")
    entrypoint, env = sub.build_submission(str(tmp_path / "run.yaml"), "http://10.1.2.3:8265",
                                           working_dir=tmp_path, pip=["gold-ray"])
    python, _ = parse_entrypoint(entrypoint)
    assert python == "python"
    assert env["pip"] == ["gold-ray"]


def test_local_cluster_with_pip_uses_python_from_path(tmp_path, clean_env):
    (tmp_path / "run.yaml").write_text("output: {dir: /abs/run}\n")
    entrypoint, _ = sub.build_submission(str(tmp_path / "run.yaml"), "http://localhost:8265",
                                         working_dir=tmp_path, pip=["requests"])
    assert parse_entrypoint(entrypoint)[0] == "python"


def test_config_outside_the_working_dir_travels_as_text(tmp_path, clean_env):
    config = tmp_path / "elsewhere" / "mine.yaml"
    config.parent.mkdir()
    config.write_text("budget: {samples: 8}\noutput: {dir: /abs/run}\n")
    (tmp_path / "project").mkdir()
    entrypoint, env = sub.build_submission(str(config), "http://127.0.0.1:8265", working_dir=tmp_path / "project")
    _, opts = parse_entrypoint(entrypoint)
    assert opts["--config"] == ["env:GOLD_RAY_CONFIG_YAML"]
    assert env["env_vars"]["GOLD_RAY_CONFIG_YAML"] == config.read_text()
    assert env["env_vars"]["GOLD_RAY_CONFIG_NAME"] == "mine.yaml"


def test_image_uploads_nothing_and_ships_the_config(tmp_path, clean_env):
    (tmp_path / "run.yaml").write_text("output: {dir: /abs/run}\n")
    entrypoint, env = sub.build_submission(str(tmp_path / "run.yaml"), "http://127.0.0.1:8265",
                                           working_dir=tmp_path, image="registry.example.com/x:1")
    # Ray 2.60 refuses image_uri next to working_dir or pip.
    assert set(env) == {"image_uri", "env_vars"}
    assert parse_entrypoint(entrypoint)[0] == "python"
    assert parse_entrypoint(entrypoint)[1]["--config"] == ["env:GOLD_RAY_CONFIG_YAML"]
    with pytest.raises(sub.SubmitError, match="--image and --pip"):
        sub.build_submission(str(tmp_path / "run.yaml"), None, image="x:1", pip=["y"])


def test_shipped_name_is_passed_as_is(tmp_path, clean_env):
    entrypoint, env = sub.build_submission("tiny", "http://127.0.0.1:8265", working_dir=REPO_ROOT)
    _, opts = parse_entrypoint(entrypoint)
    assert opts["--config"] == ["tiny"]
    assert "GOLD_RAY_CONFIG_YAML" not in env["env_vars"]


def test_relative_output_dir_is_made_absolute_on_a_local_cluster(tmp_path, clean_env):
    (tmp_path / "run.yaml").write_text("output: {dir: runs/x}\n")
    clean_env.chdir(tmp_path)  # CONFIG is a local path, relative to where the command runs
    entrypoint, _ = sub.build_submission("run.yaml", "http://127.0.0.1:8265", working_dir=tmp_path)
    # Otherwise the run would land in the job's temporary copy of the working dir.
    assert parse_entrypoint(entrypoint)[1]["--set"] == [f"output.dir={(tmp_path / 'runs/x').resolve()}"]


def test_relative_output_dir_on_a_remote_cluster_warns(tmp_path, clean_env, capsys):
    (tmp_path / "run.yaml").write_text("output: {dir: runs/x}\n")
    clean_env.chdir(tmp_path)
    entrypoint, _ = sub.build_submission("run.yaml", "http://10.0.0.9:8265", working_dir=tmp_path)
    assert "--set" not in parse_entrypoint(entrypoint)[1]
    assert "shared" in capsys.readouterr().err


def test_broken_config_is_left_for_the_job_to_report(tmp_path, clean_env):
    (tmp_path / "bad.yaml").write_text("budget: {samples: 8, bogus_key: 1}\n")
    clean_env.chdir(tmp_path)
    entrypoint, _ = sub.build_submission("bad.yaml", "http://127.0.0.1:8265", working_dir=tmp_path)
    assert parse_entrypoint(entrypoint)[1] == {"--config": ["bad.yaml"]}


def test_forwarded_environment_is_the_named_variables_only(tmp_path, clean_env, capsys):
    (tmp_path / "run.yaml").write_text("output: {dir: /abs/run}\n")
    clean_env.setenv("GOLD_RAY_DATA", "/data")
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    clean_env.setenv("OPENAI_API_KEY", "sk-secret")
    clean_env.chdir(tmp_path)
    _, env = sub.build_submission("run.yaml", "http://127.0.0.1:8265", working_dir=tmp_path)
    # The named variables, and the ones that keep the job's workers as quiet as a local run's.
    assert env["env_vars"] == {"GOLD_RAY_DATA": "/data", "MLFLOW_TRACKING_URI": "http://mlflow:5000", **worker_env(),
                               "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    assert env["env_vars"]["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"
    _, env = sub.build_submission("run.yaml", "http://127.0.0.1:8265", working_dir=tmp_path,
                                  env=["OPENAI_API_KEY", "GOLD_RAY_DATA=/mnt/data"])
    assert env["env_vars"]["OPENAI_API_KEY"] == "sk-secret"
    assert env["env_vars"]["GOLD_RAY_DATA"] == "/mnt/data"  # an explicit value wins
    assert "is a path on this machine" not in capsys.readouterr().err  # a local cluster has its paths
    clean_env.setenv("HF_HOME", "/home/me/.cache/hf")
    sub.build_submission("run.yaml", "http://head.example:8265", working_dir=tmp_path, env=["GOLD_RAY_DATA=/mnt/data"])
    err = capsys.readouterr().err
    assert "HF_HOME=/home/me/.cache/hf is a path on this machine" in err and "--env HF_HOME=" in err
    assert "GOLD_RAY_DATA" not in err  # named with --env: the user chose its value for the cluster
    with pytest.raises(sub.SubmitError, match="NOT_SET_ANYWHERE"):
        sub.build_submission("run.yaml", None, working_dir=tmp_path, env=["NOT_SET_ANYWHERE"])


@pytest.mark.parametrize(("address", "local"), [
    ("http://127.0.0.1:8265", True), ("http://localhost:8265", True), ("127.0.0.1:8265", True),
    (f"http://{socket.gethostname()}:8265", True), ("http://10.0.0.1:8265", False),
    ("http://head.example.com:8265", False), (None, False),
])
def test_is_local_address(address, local):
    assert sub.is_local_address(address) is local


def test_auth_headers_read_the_token(tmp_path, clean_env):
    token_file = tmp_path / "token"
    token_file.write_text("abc123\n")
    clean_env.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert sub.auth_headers() == {"Authorization": "Bearer abc123"}
    clean_env.setenv("RAY_AUTH_TOKEN", "fromenv")
    assert sub.auth_headers() == {"Authorization": "Bearer fromenv"}


def test_cli_registers_submit_and_jobs():
    parser = argparse.ArgumentParser()
    sub.add_job_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["submit", "tiny", "--address", "http://h:8265", "--follow", "--set", "a.b=1",
                              "--pip", "x", "--env", "K"])
    assert (args.func, args.config, args.follow, args.set, args.pip, args.env) == (
        sub.cmd_submit, "tiny", True, ["a.b=1"], ["x"], ["K"])
    args = parser.parse_args(["jobs", "logs", "raysubmit_1", "--address", "http://h:8265", "--follow"])
    assert (args.func, args.jobs_cmd, args.job_id, args.follow) == (sub.cmd_jobs, "logs", "raysubmit_1", True)


def test_unreachable_cluster_is_one_clear_error(capsys):
    port = free_port()
    status = sub.main(["jobs", "status", "raysubmit_1", "--address", f"http://127.0.0.1:{port}"])
    assert status == 2
    assert f"127.0.0.1:{port}" in capsys.readouterr().err


class FakeJobClient:
    """A fake of the SDK's ``JobSubmissionClient`` for ``follow_job`` (unit tests only).

    Connection ``k`` streams ``connections[k]`` (chunks of the log from its start, cut anywhere) and
    then, as ``endings[k]`` says, fails as the SDK does on close code 1006 ("drop"), closes while the
    job runs ("close"), or closes because the job ended ("end"). Status queries (``follow_job``
    asks once before it connects) answer from ``statuses`` in turn (an exception there is
    raised), then the last one for good.
    """

    def __init__(self, log: str, connections: list[list[str]], endings: list[str], statuses: list):
        self.log, self.chunks, self.endings, self.statuses = log, connections, endings, statuses
        self.opened = 0

    async def tail_job_logs(self, job_id):
        k = self.opened
        self.opened += 1
        for chunk in self.chunks[k]:
            yield chunk
        if self.endings[k] == "drop":
            raise RuntimeError("WebSocket connection closed unexpectedly with close code 1006")

    def get_job_status(self, job_id):
        answer = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if isinstance(answer, Exception):
            raise answer
        return argparse.Namespace(value=answer)

    def get_job_logs(self, job_id):
        return self.log


def follow(client: FakeJobClient, **options) -> tuple[str, str]:
    """``follow_job`` on ``client`` without waits: its status and what it wrote."""
    out = io.StringIO()
    return sub.follow_job(None, "raysubmit_1", out=out, client=client, settle_s=0, retry_s=0, **options), out.getvalue()


@pytest.mark.parametrize("ending", ["drop", "close"])
def test_following_a_job_reconnects_when_its_log_stream_drops_and_writes_each_line_once(ending, capsys):
    # Each connection replays the log from its start, cut into different chunks.
    client = FakeJobClient("a\nb\nc\nd\n", [["a\nb"], ["a\n", "b\nc\n"], ["a\nb\nc\nd\n"]],
                           [ending, ending, "end"], ["RUNNING", "RUNNING", "RUNNING", "SUCCEEDED"])
    assert follow(client) == ("SUCCEEDED", "a\nb\nc\nd\n")
    assert client.opened == 3
    assert capsys.readouterr().err.count("reconnecting") == 2


def test_following_writes_the_end_the_stream_missed_when_the_job_ends_after_a_drop():
    client = FakeJobClient("a\nb\nTraceback: boom\n", [["a\n"]], ["drop"], ["RUNNING", "FAILED"])
    assert follow(client) == ("FAILED", "a\nb\nTraceback: boom\n")


def test_following_survives_a_dashboard_that_does_not_answer_for_a_moment():
    client = FakeJobClient("a\nb\n", [["a\n"], ["a\nb\n"]], ["drop", "end"],
                           ["RUNNING", ConnectionError("dashboard restarting"), "SUCCEEDED"])
    assert follow(client) == ("SUCCEEDED", "a\nb\n")


def test_following_gives_up_when_the_stream_keeps_dropping_without_news():
    client = FakeJobClient("same line\n", [["same line\n"]] * 5, ["drop"] * 5, ["RUNNING"])
    with pytest.raises(sub.SubmitError, match=r"raysubmit_1 dropped 3 times.*RUNNING.*jobs logs raysubmit_1"):
        follow(client, max_drops=3)
    assert client.opened == 3


def test_following_an_unknown_job_is_an_error_at_once():
    client = FakeJobClient("", [], [], [RuntimeError("Job raysubmit_1 does not exist")])
    with pytest.raises(RuntimeError, match="does not exist"):
        follow(client)
    assert client.opened == 0


def test_a_quiet_job_whose_stream_held_for_a_while_is_not_given_up_on():
    # Every connection lasted "long" (steady_s=0): a job that prints nothing for minutes is not a
    # broken stream.
    client = FakeJobClient("x\n", [["x\n"]] * 6, ["close"] * 5 + ["end"], ["RUNNING"] * 6 + ["SUCCEEDED"])
    assert follow(client, max_drops=2, steady_s=0) == ("SUCCEEDED", "x\n")


# ---- a real local Ray head ---------------------------------------------------------------------


def activated_env() -> dict[str, str]:
    """This environment as ``. .venv/bin/activate`` leaves it, less a Ray address or MLflow URI.

    The README starts the head from the activated venv: a plain ``ray job submit`` entrypoint's
    ``python`` is looked up on the head's ``PATH``.
    """
    env = {k: v for k, v in os.environ.items() if k not in {"RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_MODE"}}
    env.update(VIRTUAL_ENV=str(BIN.parent), PATH=os.pathsep.join((str(BIN), env.get("PATH", ""))))
    return env


HEAD_TEMP_DIRS: dict[str, Path] = {}
"""Each running head's temp dir by dashboard URL, for the head's own logs when a job goes wrong."""

HEAD_LOGS = ("dashboard_agent.log", "runtime_env_agent.log", "runtime_env_setup-*.log", "raylet.err")


def job_account(address: str, job_id: str | None) -> str:
    """What went on with a job, for an assertion message: its status and Ray's message, the end of
    its logs, and the end of the head's agent logs (a job that fails before its driver writes a
    line leaves its reason there)."""
    if job_id is None:
        return "no job was submitted"
    parts = []
    try:
        status, message = sub.job_status(address, job_id)
        parts.append(f"job {job_id}: {status} ({message})\n--- job logs ---\n{sub.job_logs(address, job_id)[-3000:]}")
    except Exception as err:  # noqa: BLE001 - an account of a broken head must not raise itself
        parts.append(f"job {job_id}: could not be read: {err!r}")
    logs = HEAD_TEMP_DIRS.get(address, Path("/nonexistent")) / "session_latest" / "logs"
    for pattern in HEAD_LOGS:
        for path in sorted(logs.glob(pattern)):
            parts.append(f"--- {path.name} ---\n" + path.read_text(errors="replace")[-2000:])
    return "\n".join(parts)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A Ray head started with ``ray start`` (in the activated venv) on free ports; yields its dashboard URL.

    Teardown stops the head's own process group and whatever else carries its temp dir; it does
    not run ``ray stop``, which kills every Ray process on the machine, other people's included.
    """
    temp_dir = tempfile.mkdtemp(prefix="grj", dir="/tmp")  # Ray's socket paths need a short prefix
    dashboard = free_port()
    ports = {
        "--port": free_port(), "--dashboard-port": dashboard, "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(), "--metrics-export-port": free_port(),
        "--ray-client-server-port": free_port(), "--runtime-env-agent-port": free_port(),
        "--node-manager-port": free_port(), "--object-manager-port": free_port(),
    }
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--dashboard-host=127.0.0.1", "--num-cpus=4",
           f"--temp-dir={temp_dir}", "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items())]
    env = activated_env()
    env.update(RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false")
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 - closed in teardown
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    HEAD_TEMP_DIRS[address] = Path(temp_dir)
    try:
        deadline = time.monotonic() + 180
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start exited with {head.returncode}: {Path(log.name).read_text()[-2000:]}")
            try:
                sub._client(address).list_jobs()
                break
            except sub.SubmitError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)
        yield address
    finally:
        try:
            client = sub._client(address)
            for job in client.list_jobs():
                if str(job.status.value) not in sub.TERMINAL_STATUSES:
                    client.stop_job(job.submission_id)
        except Exception:  # noqa: BLE001 - best effort; the kills below still run
            pass
        try:
            # `ray start --block` takes 20 s and more to stop on SIGTERM; what is left after a few
            # seconds is killed below (the head's group, then whatever carries its temp dir).
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=3)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        kill_marked(temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def gold_ray(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run the ``gold-ray`` console script from the project folder."""
    env = {k: v for k, v in os.environ.items() if k not in {"RAY_ADDRESS", "MLFLOW_TRACKING_URI"}}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return subprocess.run([str(BIN / "gold-ray"), *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny random Llama chat teacher, a tiny random BERT student and an 8-row eval file."""
    root = tmp_path_factory.mktemp("models")
    eval_path = root / "eval.jsonl"
    rows = [("a warm and funny film", "positive"), ("dull, flat and far too long", "negative")] * 4
    eval_path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    teacher = Path(save_tiny_chat_lm(root / "teacher"))
    return {"teacher": teacher, "student": Path(save_tiny_classifier(root / "student")), "eval": eval_path}


def tiny_config(models: dict[str, Path], run_dir: Path, *, iterations: int = 1, samples: int = 16) -> dict:
    """A run sized for a 2-core machine: 16 samples in one iteration, tiny models, two epochs a
    training, tracking on (SQLite in the run dir)."""
    return {
        "seed": 0,
        "task": {"name": "sst2", "eval_path": str(models["eval"]), "eval_limit": 8},
        "teacher": {
            "model": str(models["teacher"]), "engine": "hf", "prompt_style": "chat", "max_new_tokens": 16,
            "batch_size": 8, "dtype": "float32",
            "serve": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5},
        },
        "student": {"model": str(models["student"]), "max_length": 32, "batch_size": 8, "epochs_per_iteration": 2,
                    "final_epochs": 1},
        "strategy": {"name": "gold", "iterations": iterations},
        "budget": {"samples": samples, "max_reject_share": 1.0},
        "resources": {"scorer_min_actors": 1, "scorer_max_actors": 1, "scorer_num_cpus": 0.25,
                      "scorer_batch_size": 16, "train_workers": 1, "train_cpus_per_worker": 0.5},
        "tracking": {"enabled": True},
        "output": {"dir": str(run_dir)},
    }


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def mlflow_run_ids(run_dir: Path) -> list[str]:
    """The top-level MLflow runs in the run directory's store (Ray Train's child runs left out)."""
    with sqlite3.connect(run_dir / "mlflow.db") as db:
        return [row[0] for row in db.execute(
            "select run_uuid from runs where run_uuid not in"
            " (select run_uuid from tags where key = 'mlflow.parentRunId')")]


def job_of(address: str, config: Path) -> str | None:
    """The id of the one job on the head whose entrypoint names ``config``; None before it is there."""
    ids = {job.submission_id for job in sub._client(address).list_jobs()
           if job.entrypoint and str(config) in job.entrypoint}
    assert len(ids) <= 1, ids
    return ids.pop() if ids else None


def job_id_of(stdout: str) -> str | None:
    """The job id ``gold-ray submit`` printed; None where it printed none."""
    line = next((line for line in stdout.splitlines() if line.startswith("gold-ray: submitted job ")), None)
    return line.split()[3] if line else None


@pytest.mark.ray
@pytest.mark.own_ray
@pytest.mark.slow
def test_broken_config_fails_the_job_with_the_key_in_its_logs(ray_head, tmp_path):
    config = write_config(tmp_path / "broken.yaml", {"budget": {"samples": 16, "bogus_key": 1},
                                                     "output": {"dir": str(tmp_path / "run")}})
    result = gold_ray("submit", str(config), "--address", ray_head, "--working-dir", str(REPO_ROOT),
                      "--follow", timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "finished: FAILED" in result.stdout
    assert "Ray says: " in result.stdout  # Ray's account of the failure, under the status
    logs = sub.job_logs(ray_head, job_id_of(result.stdout))
    assert "budget.bogus_key" in logs, result.stdout[-2000:] + job_account(ray_head, job_id_of(result.stdout))
    assert "broken.yaml" in logs  # the error names the user's file, not a temporary one
    assert sub.job_status(ray_head, job_id_of(result.stdout))[0] == "FAILED"
    assert not (tmp_path / "run").exists()


def readme_ray_job_submit() -> tuple[dict[str, str], list[str]]:
    """The README's plain ``ray job submit`` command: its leading ``NAME=VALUE`` environment and
    its words. The README runs it, and starts the head, in the activated venv, as the head fixture does."""
    text = (REPO_ROOT / "README.md").read_text()
    match = re.search(r"^\. \.venv/bin/activate\n(?:.*\n)*?((?:\w+=\S+ )*ray job submit .+)$", text, re.MULTILINE)
    assert match, "README.md shows no `. .venv/bin/activate` followed by a `ray job submit ...` line"
    words = shlex.split(match.group(1))
    env = {}
    while "=" in words[0]:
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return env, words


def with_option(words: list[str], option: str, value: str) -> list[str]:
    """``words`` with the value after ``option`` replaced; the option must be there."""
    assert option in words, f"the README's command has no {option}: {shlex.join(words)}"
    i = words.index(option)
    return [*words[: i + 1], value, *words[i + 2:]]


def readme_plain_submit(address: str, config: Path) -> subprocess.Popen[str]:
    """Start the README's plain ``ray job submit`` command as written, but for this head and config.

    It waits for the job and prints its logs, as the README's reader sees them.
    """
    readme_env, words = readme_ray_job_submit()
    words = with_option(with_option(words, "--address", address), "--config", str(config))
    assert words[:3] == ["ray", "job", "submit"] and "--working-dir" in words, words
    return subprocess.Popen(words, cwd=REPO_ROOT, env={**activated_env(), **readme_env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.ray
@pytest.mark.own_ray
@pytest.mark.slow
def test_a_job_whose_driver_is_killed_resumes_when_resubmitted_and_succeeds_with_its_outputs(
        ray_head, tiny_models, tmp_path):
    """The README's two ways to submit, in one run (a job run costs minutes on 2 cores): the plain
    ``ray job submit`` starts it and its driver is killed; ``gold-ray submit --follow`` finishes it."""
    import psutil

    from tests.faults.hooks import clear_plans, plan_fault

    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_models, run_dir))
    # The driver actor holds inside iteration 0's train stage until the job's driver process (the
    # entrypoint, `python -m jobs.distill`) is killed with SIGKILL, as an OOM killer or a lost pod would.
    held, gate = tmp_path / "held.json", tmp_path / "gate"
    plan_fault("stage.start", held, action="hold", gate=gate, iteration=0, stage="train")
    first = readme_plain_submit(ray_head, config)
    try:
        deadline = time.monotonic() + 600
        while not held.exists():
            if first.poll() is not None:
                # Ray's CLI exits when its log stream drops (close code 1006) while the job runs
                # on; only the job ending is a failure here.
                job_id = job_of(ray_head, config)
                status = sub.job_status(ray_head, job_id)[0] if job_id else None
                assert job_id is not None and status not in sub.TERMINAL_STATUSES, (
                    first.stdout.read()[-4000:] + job_account(ray_head, job_id))
            assert time.monotonic() < deadline, "the run never reached iteration 0's train stage"
            time.sleep(1)
        # The entrypoint runs in the job's working dir, as the driver actor it started does.
        workdir = psutil.Process(json.loads(held.read_text())["pid"]).cwd()
        entry = [p for p in psutil.process_iter(["cmdline"])
                 if "jobs.distill" in " ".join(p.info["cmdline"] or ()) and p.cwd() == workdir]
        # Ray runs it through `sh -c` in a session of its own: the one process group to kill.
        groups = {os.getpgid(p.pid) for p in entry}
        assert entry and len(groups) == 1, entry
        os.killpg(groups.pop(), signal.SIGKILL)
        out, _ = first.communicate(timeout=300)
        assert first.returncode != 0, out[-4000:]
        job_id = job_of(ray_head, config)
        assert job_id and sub.job_status(ray_head, job_id)[0] == "FAILED", job_account(ray_head, job_id)
    finally:
        gate.touch()
        clear_plans()
        if first.poll() is None:
            first.kill()
    state = json.loads((run_dir / "state.json").read_text())
    assert (state["iteration"], state["stage"], state["finished"]) == (0, "generate", False)
    committed = {p: (run_dir / p).read_bytes() for p in state["parts"]}
    assert committed, "the first stage committed no part"

    # The resubmission is the README's `gold-ray submit --follow`.
    again = gold_ray("submit", str(config), "--address", ray_head, "--working-dir", str(REPO_ROOT), "--follow")
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:] + job_account(
        ray_head, job_id_of(again.stdout))
    assert "finished: SUCCEEDED" in again.stdout
    assert "resuming the committed run" in again.stdout
    # Committed parts are kept as they were: nothing generated before the kill is redone.
    for part, data in committed.items():
        assert (run_dir / part).read_bytes() == data, part
    assert json.loads((run_dir / "state.json").read_text())["finished"] is True
    assert (run_dir / "student" / "config.json").is_file()
    assert len(json.loads((run_dir / "metrics.json").read_text())["iterations"]) == 1
    # Every committed row once: 16 samples requested, 16 rows (accepted or rejected), 16 ids.
    state = json.loads((run_dir / "state.json").read_text())
    ids = [r["id"] for r in read_parts([run_dir / p for p in state["parts"]])]
    assert len(ids) == len(set(ids)) == 16
    # The job says where the outputs and the MLflow run are; the killed attempt and its resumption
    # are one MLflow run.
    run_ids = mlflow_run_ids(run_dir)
    assert len(run_ids) == 1, run_ids
    assert f"run directory: {run_dir}" in again.stdout
    assert f"MLflow run:          {run_ids[0]}" in again.stdout, again.stdout[-2000:]
