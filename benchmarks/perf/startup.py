"""Benchmark 10, a run's set-up: how long after launch each runtime ends its first iteration's stages.

::

    GOLD_RAY_DATA=../shared/data python -m benchmarks.perf.startup [--repeats 3] [--samples 64]
        [--iterations 2] [--runtimes local,ray] [--config demo] [--set KEY=VALUE ...] [--out DIR]

Launches ``gold-ray distill`` as a user does (MLflow tracking off: both runtimes open the same
store in the same way, 2 to 3 s), on Ray and with ``--local``, one after the other
``--repeats`` times (interleaved, so that a machine that speeds up or slows down over the minutes
touches both alike), reads the run's events (``--json-logs``) as they come and stops the run
(Ctrl-C) once iteration 0's train stage has ended. Per runtime: the seconds from launch to the
``start`` event (the command's imports), to ``plan`` (Ray's start on Ray; the runtime's models and
actors up),
and to the end of iteration 0's ``generate`` and ``train`` stages (the scorers start in the first
training's evaluation on Ray). The rest of a run is the same stages again with warm models, which
``e2e`` times; what Ray adds once per run is here, in a few minutes instead of a whole demo.

Headline keys: ``startup_ray_over_local`` (iteration 0's train stage ended, Ray over local, medians)
and ``startup_ray_extra_s`` (the same, Ray minus local, seconds). Without a data folder
(``$GOLD_RAY_DATA``) each run first looks for SST-2's evaluation set on the Hub, which on a
machine without network adds retries to both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from benchmarks.perf.common import (
    add_common_args,
    command_line,
    fmt,
    log,
    markdown_table,
    new_result,
    ratio,
    repeats_of,
    spread_cell,
    summarize,
    write_result,
)

MARKS = ("start", "plan", "generate0", "train0")
"""What is timed from launch: the ``start`` and ``plan`` events, and iteration 0's generate and train stages."""

RUNTIMES = ("local", "ray")
STOP_AFTER = "train0"
EXIT_WAIT_S = 180.0
"""Seconds a run may take to exit after its Ctrl-C."""
RUN_TIMEOUT_S = 1800.0
"""Seconds a run may take from launch to its exit."""


def event_marks(lines: Iterable[str], launched: float) -> dict[str, float]:
    """Seconds from ``launched`` (a Unix time) to each of :data:`MARKS` found in a run's JSON event
    lines (``gold-ray distill --json-logs``); lines that are not events are skipped."""
    marks: dict[str, float] = {}
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict) or "time" not in event:
            continue
        name = event.get("event")
        key = f"{name}{event.get('iteration')}" if name in ("generate", "train") else name
        if key in MARKS and key not in marks:
            marks[key] = datetime.fromisoformat(event["time"]).timestamp() - launched
    return marks


def time_setup(cmd: list[str], env: dict[str, str], timeout_s: float = RUN_TIMEOUT_S) -> dict[str, float]:
    """Launch ``cmd`` (a ``gold-ray distill --json-logs`` command), stop it with Ctrl-C once
    :data:`STOP_AFTER` has passed, and return :func:`event_marks` of its events.

    A run still going ``timeout_s`` after launch, or :data:`EXIT_WAIT_S` after its Ctrl-C, is
    killed with its process group (the Ray it started follows it, ``actors.reaper``), as is a run
    whose benchmark is stopped.

    Raises:
        SystemExit: the run ended, or was killed, before :data:`STOP_AFTER` (its stderr's tail in the message).
    """
    launched = time.time()
    with tempfile.TemporaryFile("w+") as err:
        # Ctrl-C is SIGINT at its default: a shell's background job (and a pytest-xdist worker) starts
        # with it ignored, and a Python child then never raises KeyboardInterrupt.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        lines: queue.Queue[str | None] = queue.Queue()

        def read() -> None:
            # To the end, also after Ctrl-C: a full pipe would block the run's shutdown.
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        seen: list[str] = []
        deadline, stopped = launched + timeout_s, False
        try:
            while True:
                try:
                    line = lines.get(timeout=max(0.0, deadline - time.time()))
                except queue.Empty:
                    break  # past the deadline: killed below
                if line is None:
                    break
                seen.append(line)
                if not stopped and STOP_AFTER in event_marks([line], launched):
                    proc.send_signal(signal.SIGINT)
                    deadline, stopped = time.time() + EXIT_WAIT_S, True
            proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass  # killed below
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        marks = event_marks(seen, launched)
        if STOP_AFTER not in marks:
            err.seek(0)
            raise SystemExit(f"startup: {' '.join(cmd)} exited {proc.returncode} before iteration 0's train stage "
                             f"ended:\n{err.read()[-2000:]}")
    return marks


def distill_command(runtime: str, out_dir: Path, args: argparse.Namespace) -> list[str]:
    """The ``gold-ray distill`` command of one runtime, as a user types it, plus the benchmark's sizes."""
    cmd = [sys.executable, "-m", "gold_ray.cli", "distill", args.config, "--overwrite", "--output",
           str(out_dir / runtime), "--json-logs", "--set", f"budget.samples={args.samples}",
           "--set", f"strategy.iterations={args.iterations}", "--set", "tracking.enabled=false"]
    for kv in args.set:
        cmd += ["--set", kv]
    return [*cmd, "--local"] if runtime == "local" else cmd


def main(argv: list[str] | None = None) -> int:
    """Time both runtimes' set-up; write ``startup.json`` and ``startup.md``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--samples", type=int, default=64, help="teacher samples of the whole run (default 64)")
    p.add_argument("--iterations", type=int, default=2, help="iterations of the run (default 2)")
    p.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma list of local, ray (default both)")
    args = p.parse_args(argv)
    repeats = repeats_of(args)
    result = new_result("startup", command_line("benchmarks.perf.startup", argv), {
        "config": args.config, "overrides": args.set, "samples": args.samples, "iterations": args.iterations,
        "repeats": repeats, "quick": args.quick, "data_folder": bool(os.environ.get("GOLD_RAY_DATA")),
    })
    asked = {r.strip() for r in args.runtimes.split(",") if r.strip()}
    if not asked or asked - set(RUNTIMES):
        p.error(f"--runtimes: {args.runtimes!r} names none or other than {', '.join(RUNTIMES)}")
    runtimes = [r for r in RUNTIMES if r in asked]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    runs: dict[str, list[dict[str, float]]] = {r: [] for r in runtimes}
    with tempfile.TemporaryDirectory(prefix="gold-ray-startup-") as tmp:
        for i in range(repeats):
            for runtime in runtimes:
                marks = time_setup(distill_command(runtime, Path(tmp), args), env)
                log(f"startup: repeat {i + 1}/{repeats} {runtime}: "
                    + ", ".join(f"{k} {v:.1f} s" for k, v in marks.items()))
                runs[runtime].append(marks)
    metrics = {r: {k: summarize([m.get(k) for m in runs[r]]) for k in MARKS} for r in runtimes}
    result["metrics"] = {"runs": runs, "marks": metrics}
    rows = [[k, *(spread_cell(metrics[r][k]) for r in runtimes)] for k in MARKS]
    headers = ["mark", *(f"{r} s" for r in runtimes)]
    said = ""
    if len(runtimes) == 2:
        med = {r: {k: metrics[r][k]["median"] for k in MARKS} for r in runtimes}  # every mark is in every run
        result["headline"] = {"startup_ray_over_local": ratio(med["ray"][STOP_AFTER], med["local"][STOP_AFTER]),
                              "startup_ray_extra_s": med["ray"][STOP_AFTER] - med["local"][STOP_AFTER]}
        headers += ["ray - local s (medians)", "ray / local"]
        for row, k in zip(rows, MARKS, strict=True):
            row += [fmt(med["ray"][k] - med["local"][k]), fmt(ratio(med["ray"][k], med["local"][k]))]
        said = (f"Iteration 0's train stage ended {result['headline']['startup_ray_extra_s']:.1f} s later on Ray "
                f"({result['headline']['startup_ray_over_local']:.2f} x local).")
    body = "\n".join([f"## Seconds from launch, {repeats} interleaved repeats per runtime", "",
                      markdown_table(headers, rows), "", said])
    write_result(result, body, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
