"""Benchmark 9, where a command's CPU goes: CPU-seconds per process kind, start-up apart from steady state.

::

    python -m benchmarks.perf.cpu_by_process --name demo-ray [--out DIR] [--interval 0.5] -- gold-ray distill demo ...

Runs the command and samples its process tree every ``--interval`` seconds until it exits. Every process
descended from the command is counted (Ray's GCS, raylet, agents and workers are, when the command
starts its own Ray); nothing else on the machine is. A process's *kind* is its title as Ray sets it
(``ray::ServeReplica``, ``ray::RayTrainWorker``, ``ray::IDLE``, ...) or its program's name
(``gcs_server``, ``raylet``, ``log_monitor.py``); the command itself is ``command``. Per kind the
tables give the processes, their CPU-seconds in each process's first ``--startup-s`` seconds
(start-up: imports, model loading) and after (steady work and idling), and how many cores a
process of the kind used on average after its start-up. A timeline gives the cores the command's
processes used, and the cores the whole machine was busy, per ``--window-s`` seconds.

Why: on a machine with few cores, a Ray run pays for every process it holds twice, once to start
it and then while it idles; this tells which processes those are, in one run, on the machine at hand
(``benchmarks/perf/README.md`` reads a run of the demo on Ray against ``--local``).

The process tree and CPU times come from psutil. CPU time of a process that exits between two
samples is counted up to its last sample.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.perf.common import (
    fmt,
    log,
    markdown_table,
    new_result,
    process_tree,
    run_sampled,
    write_result,
)


@dataclass
class Proc:
    """One sampled process: its title, when it was first seen, and its CPU-seconds at each sample."""

    pid: int
    title: str
    first_s: float
    samples: list[tuple[float, float]] = field(default_factory=list)

    def cpu_s(self, until_s: float | None = None) -> float:
        """CPU-seconds of its life up to its last sample, or up to its last sample at or before ``until_s``.

        Every process counted was born after the command started, so its CPU before its first sample counts too.
        """
        points = self.samples if until_s is None else [p for p in self.samples if p[0] <= until_s]
        return points[-1][1] if points else 0.0


def process_kind(title: str, is_root: bool = False) -> str:
    """The kind a process title is counted under (see the module docstring).

    >>> process_kind("ray::ServeReplica:teacher-1a2b:TeacherDeployment.handle_request")
    'ray::ServeReplica'
    >>> process_kind("/venv/bin/python -u /venv/lib/ray/_private/log_monitor.py --session-dir=x")
    'log_monitor.py'
    """
    if is_root:
        return "command"
    if title.startswith("ray::"):
        # "ray::Name:replica-id:method" and "ray::Name.method": the actor or task name
        return "ray::" + re.split(r"[:.\s]", title[5:], maxsplit=1)[0]
    words = title.split()
    if not words:
        return "(no title)"
    program = Path(words[0]).name
    if program.startswith("python") and len(words) > 1:
        for i, word in enumerate(words[1:], 1):
            if word == "-c":
                return "python -c"
            if word == "-m" and i + 1 < len(words):
                return words[i + 1]
            if not word.startswith("-"):
                return Path(word).name
    return program


def machine_busy_s() -> float:
    """CPU-seconds the whole machine has not been idle since boot (all cores, any process)."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0) + getattr(t, "steal", 0.0)


def sample(command: list[str], interval_s: float) -> tuple[int, float, int, dict[int, Proc], list[tuple[float, float]]]:
    """Run ``command`` and sample its process tree until it exits.

    Returns:
        The command's exit status, its wall time, its pid, the processes seen (by pid, its own
        included) and the machine's busy CPU-seconds at each sample.
    """
    import psutil

    procs: dict[int, Proc] = {}
    machine: list[tuple[float, float]] = []
    roots: list[int] = []

    def on_sample(root: int, now: float) -> None:
        roots[:] = [root]
        machine.append((now, machine_busy_s()))
        for ps in process_tree(root) or []:
            try:
                with ps.oneshot():
                    times = ps.cpu_times()
                    proc = procs.get(ps.pid)
                    if proc is None or len(proc.samples) % 10 == 0:
                        # Ray renames a worker once it holds an actor: read the title again now and then.
                        title = " ".join(ps.cmdline())
                        if proc is None:
                            proc = procs[ps.pid] = Proc(ps.pid, title, now)
                        proc.title = title or proc.title
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            proc.samples.append((now, times.user + times.system))

    rc, wall = run_sampled(command, interval_s, on_sample)
    return rc, wall, roots[0] if roots else -1, procs, machine


def kinds_table(procs: dict[int, Proc], root: int, startup_s: float) -> list[dict[str, Any]]:
    """Per kind: processes, CPU-seconds in start-up and after, and steady cores per process."""
    rows: dict[str, dict[str, Any]] = defaultdict(lambda: {"processes": 0, "startup_cpu_s": 0.0, "steady_cpu_s": 0.0,
                                                           "steady_s": 0.0})
    for proc in procs.values():
        if not proc.samples:
            continue
        row = rows[process_kind(proc.title, proc.pid == root)]
        first = proc.samples[0][0]
        startup = proc.cpu_s(first + startup_s)
        row["processes"] += 1
        row["startup_cpu_s"] += startup
        row["steady_cpu_s"] += proc.cpu_s() - startup
        row["steady_s"] += max(0.0, proc.samples[-1][0] - first - startup_s)
    out = []
    for kind, row in rows.items():
        steady_cores = row["steady_cpu_s"] / row["steady_s"] if row["steady_s"] > 0 else None
        out.append({"kind": kind, "processes": row["processes"], "cpu_s": row["startup_cpu_s"] + row["steady_cpu_s"],
                    "startup_cpu_s": row["startup_cpu_s"], "steady_cpu_s": row["steady_cpu_s"],
                    "steady_cores_per_process": steady_cores})
    return sorted(out, key=lambda r: -r["cpu_s"])


def timeline(procs: dict[int, Proc], machine: list[tuple[float, float]], window_s: float) -> list[dict[str, Any]]:
    """Cores used by the command's processes, and cores the machine was busy, per window."""
    ours: dict[int, float] = defaultdict(float)
    for proc in procs.values():
        for (t_a, a), (_, b) in zip(proc.samples, proc.samples[1:], strict=False):
            ours[int(t_a // window_s)] += b - a
    busy: dict[int, float] = defaultdict(float)
    for (t_a, a), (_, b) in zip(machine, machine[1:], strict=False):
        busy[int(t_a // window_s)] += b - a
    last = int(machine[-1][0] // window_s) if machine else -1  # a last, partial window would read low
    return [{"from_s": w * window_s, "command_cores": ours[w] / window_s, "machine_cores": busy[w] / window_s}
            for w in range(last)]


def main(argv: list[str] | None = None) -> int:
    """Run the command under the sampler; write ``cpu-<name>.json`` and ``cpu-<name>.md``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: python -m benchmarks.perf.cpu_by_process [options] -- COMMAND ...")
    split = argv.index("--")
    own, command = argv[:split], argv[split + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--name", required=True, help="result name: writes cpu-<name>.json and .md")
    p.add_argument("--out", default=None, help="folder for the result (default: benchmarks/perf/results)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between samples (default 0.5)")
    p.add_argument("--startup-s", type=float, default=30.0, help="a process's start-up: its first seconds (default 30)")
    p.add_argument("--window-s", type=float, default=20.0, help="timeline window in seconds (default 20)")
    args = p.parse_args(own)
    if not command:
        p.error("no command after --")
    cmd_text = " ".join(command)
    result = new_result(f"cpu-{args.name}", "python -m benchmarks.perf.cpu_by_process " + " ".join(argv), {
        "command": cmd_text, "interval_s": args.interval, "startup_s": args.startup_s, "window_s": args.window_s})
    log(f"cpu_by_process: running {cmd_text}")
    rc, wall, root, procs, machine = sample(command, args.interval)
    kinds = kinds_table(procs, root, args.startup_s)
    line = timeline(procs, machine, args.window_s)
    total = sum(r["cpu_s"] for r in kinds)
    machine_cpu = machine[-1][1] - machine[0][1] if len(machine) > 1 else None
    result["metrics"] = {"exit_status": rc, "wall_s": wall, "cpu_s": total, "machine_busy_cpu_s": machine_cpu,
                         "processes": sum(r["processes"] for r in kinds), "kinds": kinds, "timeline": line}
    result["headline"] = {"cpu_s": round(total, 1), "wall_s": round(wall, 1),
                          "mean_cores": round(total / wall, 3) if wall else None}
    if rc != 0:
        result["notes"].append(f"the command exited with status {rc}: its numbers cover what ran")
    body = [
        f"## {cmd_text}",
        "",
        f"Wall {wall:.1f} s; the command's processes used {total:.1f} CPU-seconds ({total / wall:.2f} cores on"
        f" average) in {result['metrics']['processes']} processes; the machine was busy"
        f" {fmt(machine_cpu)} CPU-seconds in all (other work included). Exit status {rc}.",
        "",
        "### CPU by process kind",
        "",
        f"Start-up: each process's first {args.startup_s:g} s. Steady cores: CPU per second of a process"
        " of the kind after its start-up, averaged over its life (its own work and its idling).",
        "",
        markdown_table(["kind", "processes", "CPU-s", "start-up CPU-s", "steady CPU-s", "steady cores per process"],
                       [[r["kind"], r["processes"], fmt(r["cpu_s"]), fmt(r["startup_cpu_s"]), fmt(r["steady_cpu_s"]),
                         fmt(r["steady_cores_per_process"])] for r in kinds]),
        "",
        f"### Cores per {args.window_s:g} s",
        "",
        markdown_table(["from s", "command's processes", "machine busy"],
                       [[fmt(w["from_s"]), fmt(w["command_cores"]), fmt(w["machine_cores"])] for w in line]),
    ]
    json_path, _ = write_result(result, "\n".join(body) + "\n", args.out)
    log(f"cpu_by_process: wrote {json_path}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
