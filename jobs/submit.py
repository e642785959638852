"""Submit a distillation to a Ray cluster as a Ray job; follow, inspect and stop it.

Commands (registered on the ``gold-ray`` parser by :func:`add_job_commands`, and also available as
``python -m jobs.submit ...``)::

    gold-ray submit CONFIG --address URL [--follow] [--set key=value ...] [--pip REQ ...]
                    [--image IMAGE] [--working-dir DIR] [--env NAME[=VALUE] ...]
    gold-ray jobs status JOB_ID --address URL
    gold-ray jobs logs JOB_ID --address URL [--follow]
    gold-ray jobs stop JOB_ID --address URL

URL is the Ray dashboard (``http://HEAD:8265``). The job runs ``python -m jobs.distill --config ...``
(see :mod:`jobs.distill`) with a ``runtime_env`` built by :func:`build_submission`:

- Code: without ``--image`` the working dir (default ``.``, the project) is uploaded, minus
  :data:`EXCLUDES`; ``--pip`` adds requirements the cluster lacks. With ``--image`` nothing is
  uploaded: Ray 2.60 accepts ``image_uri`` only beside ``env_vars`` and ``config``, so the code
  and its dependencies come from the image (``cluster/docker/Dockerfile.gpu``).
- Interpreter: the entrypoint's ``python`` is resolved through the PATH of the node that runs it.
  On a local cluster with neither ``--pip`` nor ``--image`` the entrypoint names this interpreter
  (``sys.executable``) instead, so a virtualenv's packages are found; a bare ``python`` there
  would be the system one, which has no Ray.
- Config: a config inside the working dir is passed by its relative path; one outside it (or any
  config with ``--image``) travels as YAML text in ``$GOLD_RAY_CONFIG_YAML``; a shipped name
  (``tiny``) is passed as is. Paths *inside* the config (task files, local models, data) must
  exist on the cluster.
- Environment: the variables of :data:`~gold_ray.entry.FORWARDED_ENV` (``GOLD_RAY_DATA``,
  ``GOLD_RAY_CACHE``, ``MLFLOW_TRACKING_URI``, ...) are forwarded when set here, with the ones
  that keep the job's workers quiet (:func:`~gold_ray.reporting.logs.worker_env`, as a local run's
  are) and Ray Train's poll interval (:func:`gold_ray.entry.ray_train_env`). Nothing else is, API
  keys included, unless named with ``--env``. For a remote cluster, a
  note names each forwarded path variable (:data:`PATH_ENV`): the path must exist there too.
- Output: a relative ``output.dir`` would land in the job's temporary copy of the working dir, so
  on a local cluster it is made absolute against the working dir; for a remote cluster a warning
  says to point it at shared storage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlparse

from gold_ray.config import ConfigError, load_config
from gold_ray.entry import FORWARDED_ENV, SHIPPED_CONFIG_DIR, config_path, ray_train_env
from gold_ray.errors import UserError
from gold_ray.reporting.logs import worker_env

EXCLUDES = [".venv", "runs", ".cache", ".git", "__pycache__", ".pytest_cache", ".ruff_cache",
            ".hypothesis", "*.egg-info", "mlruns", "*.db"]
"""Paths (gitignore patterns) left out of the uploaded working dir: environments, outputs, caches."""

TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
"""Job statuses after which nothing changes."""

ENTRYPOINT_MODULE = "jobs.distill"

_CONFIG_TEXT_ENV = "GOLD_RAY_CONFIG_YAML"
_CONFIG_NAME_ENV = "GOLD_RAY_CONFIG_NAME"


class SubmitError(UserError, RuntimeError):
    """A submission that cannot be made (unreachable cluster, bad arguments); the message says why."""


PATH_ENV = ("GOLD_RAY_DATA", "GOLD_RAY_CACHE", "GOLD_RAY_BASELINE_CACHE", "HF_HOME", "HF_DATASETS_CACHE")
"""Forwarded variables that hold a path on this machine: a remote cluster must have it too."""


def is_local_address(address: str | None) -> bool:
    """Whether a dashboard address points at this machine (loopback or this host's name)."""
    if not address:
        return False
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    if host in {"localhost", socket.gethostname(), socket.getfqdn()}:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def entrypoint_python(address: str | None, pip: Sequence[str] | None, image: str | None) -> str:
    """The interpreter the entrypoint names: this one on a plain local cluster, else ``python``."""
    if is_local_address(address) and not pip and not image:
        return sys.executable
    return "python"


def _env_value(item: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not name:
        raise SubmitError(f"--env {item!r}: expected NAME or NAME=VALUE")
    if not sep:
        if name not in os.environ:
            raise SubmitError(f"--env {name}: not set in this environment")
        value = os.environ[name]
    return name, value


def _is_shipped_name(ref: str) -> bool:
    return not Path(ref).exists() and (SHIPPED_CONFIG_DIR / f"{ref}.yaml").is_file()


def _output_override(local_path: Path | None, overrides: list[str], address: str | None,
                     base: Path) -> str | None:
    """An ``output.dir=`` override that makes a relative output dir absolute on a local cluster."""
    if local_path is None or not local_path.is_file():
        return None
    try:
        cfg = load_config(local_path, overrides)
    except ConfigError:
        return None  # the job reports the error, where its logs keep it
    if Path(cfg.output.dir).is_absolute():
        return None
    if is_local_address(address):
        return f"output.dir={(base / cfg.output.dir).resolve()}"
    print(f"gold-ray: warning: output.dir {cfg.output.dir!r} is relative: on a remote cluster it lands in the "
          "job's temporary working dir on the head node; set --set output.dir=/shared/path", file=sys.stderr)
    return None


def build_submission(
    config: str,
    address: str | None,
    *,
    overrides: Sequence[str] = (),
    working_dir: str | os.PathLike[str] = ".",
    pip: Sequence[str] | None = None,
    image: str | None = None,
    env: Sequence[str] = (),
    resume: bool = False,
) -> tuple[str, dict[str, Any]]:
    """The entrypoint and ``runtime_env`` of a distillation job (see the module docstring).

    Args:
        config: Config YAML path, shipped config name, or a path that exists only on the cluster.
        address: Dashboard URL (decides whether the cluster is this machine).
        overrides: ``section.key=value`` overrides passed to the job.
        working_dir: Folder uploaded as the job's working dir (ignored with ``image``).
        pip: Requirements installed into the job's environment.
        image: Container image the job runs in (``image_uri``).
        env: Extra variables to forward: ``NAME`` (its value here) or ``NAME=VALUE``.
        resume: Pass ``--resume`` (a matching committed run resumes anyway).

    Returns:
        ``(entrypoint, runtime_env)`` for ``JobSubmissionClient.submit_job``.

    Raises:
        SubmitError: ``--env`` names an unset variable, or ``image`` is combined with ``pip``.
    """
    if image and pip:
        raise SubmitError("--image and --pip cannot be combined: Ray 2.60's image_uri takes no pip; "
                          "install the requirements in the image")
    forwarded = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    if address and not is_local_address(address):
        for name in sorted(set(forwarded) & set(PATH_ENV) - {_env_value(item)[0] for item in env}):
            print(f"gold-ray: note: {name}={forwarded[name]} is a path on this machine and is forwarded to the "
                  f"job; on a remote cluster it must exist there (shared storage), else pass "
                  f"--env {name}=/path/on/the/cluster", file=sys.stderr)
    # The job's own workers are as quiet as a local run's (ensure_ray adds nothing inside a job).
    env_vars = {**ray_train_env(), **worker_env(), **forwarded}
    env_vars.update(_env_value(item) for item in env)
    wd = Path(working_dir).resolve()
    local = config_path(config)
    config_arg = config
    if _is_shipped_name(config):
        pass  # the job's gold_ray (uploaded or in the image) ships it too
    elif local is not None and local.is_file():
        rel = _relative_to(local.resolve(), wd)
        if rel is not None and not image:
            config_arg = rel
        else:
            env_vars[_CONFIG_TEXT_ENV] = local.read_text(encoding="utf-8")
            env_vars[_CONFIG_NAME_ENV] = local.name
            config_arg = f"env:{_CONFIG_TEXT_ENV}"
    else:
        print(f"gold-ray: note: config {config!r} is not a file here; the job looks for it on the cluster "
              "(relative paths also under $GOLD_RAY_HOME)", file=sys.stderr)
    all_overrides = list(overrides)
    extra = _output_override(local, all_overrides, address, wd if not image else Path.cwd())
    if extra is not None:
        all_overrides.append(extra)
    parts = [entrypoint_python(address, pip, image), "-m", ENTRYPOINT_MODULE, "--config", config_arg]
    for item in all_overrides:
        parts += ["--set", item]
    if resume:
        parts.append("--resume")
    runtime_env: dict[str, Any]
    if image:
        runtime_env = {"image_uri": image, "env_vars": env_vars}
    else:
        runtime_env = {"working_dir": str(wd), "excludes": list(EXCLUDES), "env_vars": env_vars}
        if pip:
            runtime_env["pip"] = list(pip)
    return shlex.join(parts), runtime_env


def _relative_to(path: Path, folder: Path) -> str | None:
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return None


def auth_headers() -> dict[str, str] | None:
    """An ``Authorization`` header with the Ray auth token this machine holds, or None.

    The token comes from ``$RAY_AUTH_TOKEN``, the file ``$RAY_AUTH_TOKEN_PATH`` or
    ``~/.ray/auth_token`` (where ``ray start`` keeps the token of a local cluster).
    """
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not token and path.is_file():
        token = path.read_text(encoding="utf-8").strip()
    return {"Authorization": f"Bearer {token}"} if token else None


def _client(address: str | None) -> Any:
    # Ray is imported on use: `gold-ray distill` and friends should not pay for it.
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    where = address or "$RAY_ADDRESS"
    try:
        try:
            return JobSubmissionClient(address)
        except AuthenticationError as err:
            # Ray 2.60 clusters require a token by default, but the SDK only sends one when
            # RAY_AUTH_MODE=token is set here. The token is sent only after the cluster asked for
            # one, so it never goes to a dashboard that does not need it.
            headers = auth_headers()
            if headers is None:
                raise SubmitError(f"the Ray dashboard at {where} requires a token: set RAY_AUTH_TOKEN "
                                  "or RAY_AUTH_TOKEN_PATH (ray get-auth-token prints it on the head)") from err
            return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as err:
        raise SubmitError(f"the Ray dashboard at {where} refused the auth token: {err}") from err
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SubmitError(f"cannot reach the Ray dashboard at {where}: {err}") from err


def submit(
    config_path: str,
    address: str | None,
    *,
    overrides: Sequence[str] = (),
    working_dir: str | os.PathLike[str] = ".",
    pip: Sequence[str] | None = None,
    image: str | None = None,
    follow: bool = False,
    entrypoint_num_cpus: float | None = None,
    env: Sequence[str] = (),
    resume: bool = False,
    out: TextIO | None = None,
    agent_wait_s: float = 60.0,
) -> tuple[str, str | None]:
    """Submit a distillation job; optionally stream its logs until it ends.

    Args:
        config_path: Config YAML path or shipped config name (see :func:`build_submission`).
        address: Dashboard URL, e.g. ``http://127.0.0.1:8265`` (None: ``$RAY_ADDRESS``).
        overrides: ``section.key=value`` config overrides.
        working_dir: Folder uploaded as the job's working dir.
        pip: Requirements to install for the job.
        image: Container image to run the job in.
        follow: Stream the job's logs to ``out`` until it ends.
        entrypoint_num_cpus: CPUs reserved for the entrypoint (None: Ray's default, 0).
        env: Extra variables to forward (``NAME`` or ``NAME=VALUE``).
        resume: Pass ``--resume`` to the job.
        out: Where followed logs go (default stdout).
        agent_wait_s: How long to retry while the head's job agent is still starting.

    Returns:
        ``(job_id, status)``: status is the final status (``SUCCEEDED``, ``FAILED``, ``STOPPED``)
        when following, else None.

    Raises:
        SubmitError: the cluster cannot be reached or the arguments are inconsistent.
    """
    entrypoint, runtime_env = build_submission(
        config_path, address, overrides=overrides, working_dir=working_dir, pip=pip, image=image,
        env=env, resume=resume,
    )
    client = _client(address)
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            job_id = client.submit_job(
                entrypoint=entrypoint,
                runtime_env=runtime_env,
                entrypoint_num_cpus=entrypoint_num_cpus,
                metadata={"gold_ray_config": str(config_path)},
            )
            break
        except (ConnectionError, RuntimeError) as err:
            # Right after `ray start` the head's dashboard answers before its job agent has
            # registered; Ray says so and asks to try again.
            if "No available agent" in str(err) and time.monotonic() < deadline:
                time.sleep(2.0)
                continue
            raise SubmitError(f"job submission to {address} failed: {err}") from err
    if not follow:
        return job_id, None
    return job_id, follow_job(address, job_id, out=out, client=client)


class _LogCursor:
    """How much of a job's log has been written out, across reconnections."""

    def __init__(self, out: TextIO):
        self.out, self.written = out, 0

    def write(self, start: int, chunk: str) -> None:
        """Write the part of ``chunk`` (the log's characters from ``start`` on) not yet written."""
        fresh = chunk[max(0, self.written - start):]
        if fresh:
            self.out.write(fresh)
            self.out.flush()
            self.written = start + len(chunk)


async def _tail(client: Any, job_id: str, cursor: _LogCursor) -> Exception | None:
    """Stream a job's log into ``cursor``; the stream's error when it fails, None when it closes.

    Each connection streams the log from its start, so what an earlier one wrote is skipped. Only
    the stream's errors are returned: one writing the output (a closed pipe) propagates.
    """
    stream = client.tail_job_logs(job_id).__aiter__()
    start = 0
    while True:
        try:
            chunk = await stream.__anext__()
        except StopAsyncIteration:
            return None
        except Exception as err:  # noqa: BLE001 - the SDK raises RuntimeError (close code 1006), aiohttp its own
            return err
        cursor.write(start, chunk)
        start += len(chunk)


def _settled_status(client: Any, job_id: str, settle_s: float) -> str:
    """The job's status, waiting up to ``settle_s`` for a terminal one (the log stream can close a
    moment before the status turns terminal)."""
    deadline = time.monotonic() + settle_s
    status = str(client.get_job_status(job_id).value)
    while status not in TERMINAL_STATUSES and time.monotonic() < deadline:
        time.sleep(0.5)
        status = str(client.get_job_status(job_id).value)
    return status


def follow_job(address: str | None, job_id: str, *, out: TextIO | None = None, client: Any = None,
               settle_s: float = 30.0, retry_s: float = 1.0, max_drops: int = 5, steady_s: float = 30.0
               ) -> str:
    """Stream a job's logs until it ends, reconnecting when the stream drops while it runs.

    Ray's log stream can close while the job still runs: abnormally (the SDK raises, WebSocket close
    code 1006) or as if the job had ended (the head lost its agent). Either way the job goes on, so
    following it does too: the stream is opened again and the part already written is skipped.
    Once the job has ended, what the stream did not deliver is read from its whole log.

    Args:
        address: Dashboard URL.
        job_id: The submission id.
        out: Where the logs go (default stdout).
        client: A ready ``JobSubmissionClient`` (made from ``address`` when None).
        settle_s: How long to wait for a terminal status after the log stream closes normally.
        retry_s: The pause before reconnecting after a drop.
        max_drops: Drops in a row before giving up; a connection that brought new output or
            lasted ``steady_s`` ends a row.
        steady_s: How long a connection must last to count as working though the job was quiet.

    Returns:
        The job's final status.

    Raises:
        SubmitError: The stream, or the dashboard's status answer, failed ``max_drops`` times in a
            row while the job ran on.
    """
    client = client or _client(address)
    client.get_job_status(job_id)  # an unknown job or an unreachable head is an error at once, not a drop
    cursor = _LogCursor(out or sys.stdout)
    drops = 0
    while True:
        before, opened = cursor.written, time.monotonic()
        error = asyncio.run(_tail(client, job_id, cursor))
        try:
            status = _settled_status(client, job_id, settle_s if error is None else retry_s)
        except (RuntimeError, OSError) as err:  # the SDK's HTTP errors; requests' lost connection
            error, status = err, "unknown"
        if status in TERMINAL_STATUSES:
            if error is not None or cursor.written == before:
                with contextlib.suppress(RuntimeError, OSError):  # the status stands without it
                    cursor.write(0, client.get_job_logs(job_id))  # the end the stream may have missed
            return status
        steady = cursor.written > before or time.monotonic() - opened >= steady_s
        drops = 1 if steady else drops + 1
        why = f"{type(error).__name__}: {error}" if error else "closed while the job runs"
        if drops >= max_drops:
            raise SubmitError(f"the log stream of job {job_id} dropped {drops} times in a row ({why}); "
                              f"the job is {status}: follow it again with "
                              f"`gold-ray jobs logs {job_id} --follow`")
        print(f"gold-ray: the log stream of job {job_id} dropped ({why}); reconnecting", file=sys.stderr,
              flush=True)
        time.sleep(retry_s)


def job_status(address: str | None, job_id: str) -> tuple[str, str | None]:
    """A job's status and Ray's message about it (e.g. why it failed)."""
    info = _client(address).get_job_info(job_id)
    return str(info.status.value), info.message


def job_logs(address: str | None, job_id: str) -> str:
    """All logs a job has written so far."""
    return _client(address).get_job_logs(job_id)


def stop_job(address: str | None, job_id: str) -> bool:
    """Ask a job to stop; True if it was running, False if it had already ended."""
    return bool(_client(address).stop_job(job_id))


# ---- command line ------------------------------------------------------------------------------


def _default_address() -> str | None:
    return os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")


def _add_address(p: argparse.ArgumentParser) -> None:
    default = _default_address()
    p.add_argument("--address", default=default, required=default is None,
                   help="Ray dashboard URL, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)")


def _quiet_ray_logs() -> None:
    # Ray logs every packaging step of the working dir at INFO; the CLI prints its own summary.
    import ray  # noqa: F401 - importing Ray sets up its loggers, which are quieted next

    logging.getLogger("ray").setLevel(logging.WARNING)


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit a distillation; with --follow, exit 0 only if the job SUCCEEDED."""
    _quiet_ray_logs()
    if not args.image:
        print(f"gold-ray: uploading {Path(args.working_dir).resolve()} as the job's working dir "
              f"(without {', '.join(EXCLUDES)})", flush=True)
    try:
        job_id, status = submit(
            args.config, args.address, overrides=args.set or [], working_dir=args.working_dir,
            pip=args.pip, image=args.image, follow=False, entrypoint_num_cpus=args.entrypoint_num_cpus,
            env=args.env or [], resume=args.resume,
        )
        print(f"gold-ray: submitted job {job_id} to {args.address}", flush=True)
        if not args.follow:
            print(f"  follow: gold-ray jobs logs {job_id} --address {args.address} --follow")
            print(f"  status: gold-ray jobs status {job_id} --address {args.address}")
            return 0
        try:
            status = follow_job(args.address, job_id)
        except KeyboardInterrupt:
            print(f"\ngold-ray: stopped following; job {job_id} keeps running "
                  f"(stop it: gold-ray jobs stop {job_id} --address {args.address})", file=sys.stderr)
            return 130
    except (SubmitError, RuntimeError, OSError) as err:  # the SDK's: HTTP errors, a lost dashboard
        print(f"gold-ray: error: {err}", file=sys.stderr)
        return 2
    print(f"gold-ray: job {job_id} finished: {status}", flush=True)
    message = None
    if status != "SUCCEEDED":
        with contextlib.suppress(RuntimeError, OSError):  # the status stands without Ray's account
            message = job_status(args.address, job_id)[1]
    if message:
        # Where a job fails before its driver writes a line (its runtime env, say), this is the
        # only account of why.
        print(f"  Ray says: {message}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    """``jobs status|logs|stop``: inspect or stop a submitted job."""
    try:
        if args.jobs_cmd == "status":
            status, message = job_status(args.address, args.job_id)
            print(f"{args.job_id}: {status}" + (f" ({message})" if message else ""))
            return 0
        if args.jobs_cmd == "logs":
            if args.follow:
                status = follow_job(args.address, args.job_id)
                print(f"gold-ray: job {args.job_id} finished: {status}")
                return 0 if status == "SUCCEEDED" else 1
            print(job_logs(args.address, args.job_id), end="")
            return 0
        stopped = stop_job(args.address, args.job_id)
        print(f"{args.job_id}: " + ("stop requested" if stopped else "already finished"))
        return 0
    except (SubmitError, RuntimeError, OSError) as err:  # the SDK's "no such job", HTTP errors, lost connection
        print(f"gold-ray: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ngold-ray: stopped following; job {args.job_id} keeps running", file=sys.stderr)
        return 130


def add_job_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``submit`` and ``jobs status|logs|stop`` on the ``gold-ray`` sub-command parsers.

    Args:
        subparsers: What ``ArgumentParser.add_subparsers`` returned; each command sets ``func``.
    """
    p = subparsers.add_parser("submit", help="run a distillation as a job on a Ray cluster")
    p.add_argument("config", help="config YAML, or a shipped config name (demo, tiny)")
    _add_address(p)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--follow", action="store_true",
                   help="stream the job's logs until it ends; exit 0 only if it SUCCEEDED")
    p.add_argument("--pip", action="append", metavar="REQ", help="requirement to install for the job (repeatable)")
    p.add_argument("--image", help="container image to run the job in (code and dependencies from the image)")
    p.add_argument("--working-dir", default=".", help="folder uploaded as the job's working dir (default: .)")
    p.add_argument("--env", action="append", metavar="NAME[=VALUE]",
                   help="forward an environment variable, e.g. an API key name (repeatable)")
    p.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the job's driver process")
    p.add_argument("--resume", action="store_true", help="continue the run in output.dir (implied when it matches)")
    p.set_defaults(func=cmd_submit)

    p = subparsers.add_parser("jobs", help="status, logs or stop of a submitted job")
    jsub = p.add_subparsers(dest="jobs_cmd", required=True)
    for name, text in (("status", "show a job's status"), ("logs", "print a job's logs"), ("stop", "stop a job")):
        q = jsub.add_parser(name, help=text)
        q.add_argument("job_id", help="the submission id printed by gold-ray submit")
        _add_address(q)
        if name == "logs":
            q.add_argument("--follow", action="store_true", help="stream until the job ends")
    p.set_defaults(func=cmd_jobs)


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.submit submit|jobs ...``: the job commands without the rest of the CLI.

    Args:
        argv: Command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m jobs.submit", description=__doc__.split("\n")[0])
    add_job_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
