"""Benchmark 6, memory: peak resident memory of the demo, every Ray process included.

::

    python -m benchmarks.perf.memory [--quick] [--config demo] [--set key=value ...] [--interval 1.0]
        [--run-dir runs/perf-memory] [--overwrite] [--out DIR] [-- COMMAND ...]

Runs the demo (``python -m benchmarks.perf.e2e --run-demo --runtimes ray``, into ``RUN_DIR/ray``,
which starts a private local Ray whose GCS, raylet, workers, driver actor, Serve replicas, scorers
and Ray Train workers are all its descendants) or any ``COMMAND`` after ``--``, and samples the whole process tree with psutil
every ``--interval`` seconds. Reported: the peak of the summed RSS (counts shared pages once per
process, so it overstates), the peak of the summed PSS (shared pages split between the processes
that map them: the better total; Linux only), the number of processes at the peak and the largest
of them. Processes that connect to a Ray started elsewhere (``RAY_ADDRESS``) are not in the tree.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Any

from benchmarks.perf.common import (
    add_common_args,
    command_line,
    log,
    markdown_table,
    new_result,
    process_tree,
    read_result,
    run_sampled,
    write_result,
)


def portable_command(cmd: list[str], tmp: str) -> list[str]:
    """``cmd`` as results record it: this interpreter as ``python`` and the scratch folder as
    ``<tmp>``, so that no path of the machine that ran it goes into a committed result."""
    return ["python" if a == sys.executable else a.replace(tmp, "<tmp>") for a in cmd]


def tree_memory(root_pid: int, pss: bool = True) -> dict[str, Any] | None:
    """One sample: summed RSS (and PSS) of ``root_pid`` and all its descendants.

    Returns:
        ``rss``, ``pss`` (bytes; None when not readable), ``processes`` and ``top`` (the five
        largest by RSS as ``[name, rss]``); None when the root has exited.
    """
    import psutil

    procs = process_tree(root_pid)
    if procs is None:
        return None
    rss_total, pss_total, sizes = 0, 0 if pss else None, []
    for proc in procs:
        try:
            if pss:
                info = proc.memory_full_info()
                pss_total = (pss_total or 0) + getattr(info, "pss", 0)
            else:
                info = proc.memory_info()
            rss_total += info.rss
            sizes.append((proc.name(), info.rss))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    sizes.sort(key=lambda x: -x[1])
    return {"rss": rss_total, "pss": pss_total, "processes": len(sizes), "top": [list(x) for x in sizes[:5]]}


class PeakTracker:
    """Keeps the sample with the largest RSS sum and the largest PSS sum seen so far."""

    def __init__(self) -> None:
        self.peak_rss: dict[str, Any] | None = None
        self.peak_pss: int | None = None
        self.samples = 0
        self.max_processes = 0

    def add(self, sample: dict[str, Any]) -> None:
        """Fold one :func:`tree_memory` sample in."""
        self.samples += 1
        self.max_processes = max(self.max_processes, sample["processes"])
        if self.peak_rss is None or sample["rss"] > self.peak_rss["rss"]:
            self.peak_rss = sample
        if sample.get("pss") is not None and (self.peak_pss is None or sample["pss"] > self.peak_pss):
            self.peak_pss = sample["pss"]


def sample_command(cmd: list[str], interval: float, pss: bool) -> tuple[int, float, PeakTracker]:
    """Run ``cmd`` and sample its process tree until it exits.

    Returns:
        Exit status, wall seconds and the tracker.
    """
    tracker = PeakTracker()

    def on_sample(pid: int, _seconds: float) -> None:
        sample = tree_memory(pid, pss=pss)
        if sample is not None:
            tracker.add(sample)

    rc, wall = run_sampled(cmd, interval, on_sample)
    return rc, wall, tracker


def main(argv: list[str] | None = None) -> int:
    """Run and sample the demo (or a given command); write ``memory.json`` and ``memory.md``."""
    raw = list(sys.argv[1:] if argv is None else argv)
    given: list[str] = []
    if "--" in raw:
        cut = raw.index("--")
        raw, given = raw[:cut], raw[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, repeats=1)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    p.add_argument("--no-pss", action="store_true", help="sample RSS only (cheaper; PSS needs /proc/PID/smaps)")
    p.add_argument("--run-dir", default="runs/perf-memory", help="the demo run writes into RUN_DIR/ray")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --run-dir")
    args = p.parse_args(raw)
    with tempfile.TemporaryDirectory(prefix="perf-mem-") as tmp:
        if given:
            cmd, what = given, "command"
        else:
            cmd = [sys.executable, "-m", "benchmarks.perf.e2e", "--run-demo", "--runtimes", "ray",
                   "--config", args.config, "--run-dir", args.run_dir, "--no-remeasure", "--out", tmp]
            cmd += ["--quick"] if args.quick else []
            cmd += ["--overwrite"] if args.overwrite else []
            for item in args.set:
                cmd += ["--set", item]
            what = "demo"
        log(f"memory: sampling {' '.join(cmd)} every {args.interval}s")
        rc, wall, tracker = sample_command(cmd, args.interval, pss=not args.no_pss)
        demo_wall = None
        if what == "demo" and rc == 0:
            demo_wall = read_result(f"{tmp}/e2e.json")["headline"].get("e2e_demo_s")
    if rc != 0:
        log(f"memory: the command exited with {rc}; no result written")
        return rc
    peak = tracker.peak_rss or {"rss": 0, "processes": 0, "top": []}
    result = new_result("memory", command_line("benchmarks.perf.memory", argv), {
        "measured": what, "command_sampled": portable_command(cmd, tmp), "interval_s": args.interval,
        "quick": args.quick,
        "config": args.config, "overrides": args.set, "pss": not args.no_pss,
    })
    gib = 2**30
    result["metrics"] = {
        "peak_rss_sum_bytes": peak["rss"], "peak_pss_sum_bytes": tracker.peak_pss,
        "processes_at_rss_peak": peak["processes"], "max_processes": tracker.max_processes,
        "largest_at_rss_peak": peak["top"], "samples": tracker.samples, "wall_s": wall, "demo_wall_s": demo_wall,
    }
    result["headline"] = {"peak_rss_gb": peak["rss"] / gib,
                          "peak_pss_gb": tracker.peak_pss / gib if tracker.peak_pss is not None else None}
    rows = [["summed RSS (overstates shared pages)", peak["rss"] / gib],
            ["summed PSS (shared pages split)", result["headline"]["peak_pss_gb"]]]
    body = [f"## Peak memory of the {what}, whole process tree ({tracker.samples} samples, every {args.interval}s)",
            "", markdown_table(["measure", "peak GiB"], rows), "",
            f"{peak['processes']} processes at the RSS peak (at most {tracker.max_processes}); the largest: "
            + ", ".join(f"{name} {rss / 2**20:.0f} MiB" for name, rss in peak["top"]) + ".",
            "", f"Wall time {wall:.0f} s."]
    result["notes"].append("peak_rss_gb in the summary is the summed-RSS peak (the issue's measure); PSS is "
                           "the tighter total.")
    jp, mp = write_result(result, "\n".join(body), args.out)
    log(f"memory: wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
