"""Benchmark 4, scaling of the plumbing: the Ray pipeline against a teacher that only waits.

::

    python -m benchmarks.perf.scaling [--quick] [--replicas 1,2,4,8] [--latency-s 0.5] [--batch 16]
        [--rounds 4] [--repeats 3] [--out DIR]

The teacher is :class:`gold_ray.testing.LatencyBoundEngine`: every engine call sleeps
``--latency-s`` whatever its batch size, and computes nothing. With N Serve replicas (min = max =
N) the pipeline (:func:`actors.pipeline.generate_iteration`: the run's ``TeacherCaller`` actor
keeping two batches per replica in flight, Serve batching, parsing; no scoring unless
``--score``) gets ``N x batch x rounds`` prompts, so each replica has ``rounds`` full batches to do. An ideal pipeline reaches
``N x batch / latency`` samples/s; scaling efficiency is ``throughput(N) / (N x throughput(1))``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.perf.common import (
    add_common_args,
    apply_threads,
    command_line,
    free_port,
    gold_iteration_prompts,
    load_run_config,
    log,
    markdown_table,
    median_of,
    new_result,
    ratio,
    repeats_of,
    scaling_efficiency,
    spread_cell,
    start_local_ray,
    stopwatch,
    summarize,
    wait_for_serve_app,
    write_result,
)


def parse_replicas(text: str) -> list[int]:
    """``"1,2,4,8"`` as ``[1, 2, 4, 8]``; the first must be 1 (every efficiency is relative to it).

    Raises:
        ValueError: not positive integers, or not starting with 1.
    """
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise ValueError(f"--replicas {text!r}: expected comma-separated integers such as 1,2,4,8") from err
    if not counts or any(c < 1 for c in counts) or counts[0] != 1:
        raise ValueError(f"--replicas {text!r}: positive counts, starting with 1")
    return counts


def efficiencies(throughputs: dict[int, float | None]) -> dict[int, float | None]:
    """Scaling efficiency of every replica count against the one-replica throughput."""
    one = throughputs.get(1)
    return {n: scaling_efficiency(t, one, n) for n, t in throughputs.items()}


def main(argv: list[str] | None = None) -> int:
    """Measure throughput per replica count; write ``scaling.json`` and ``scaling.md``."""
    import ray
    from ray import serve

    from actors.pipeline import generate_iteration, start_caller
    from actors.teacher import start_teacher
    from gold_ray.models import resolve_model
    from gold_ray.run.tasks import load_task
    from gold_ray.teacher.parsing import Deduplicator
    from gold_ray.testing import LatencyBoundEngine

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--replicas", default=None, help="replica counts, starting with 1 (default 1,2,4,8; --quick 1,2)")
    p.add_argument("--latency-s", type=float, default=None, help="sleep per engine call (default 0.5; --quick 0.2)")
    p.add_argument("--per-prompt-s", type=float, default=0.0, help="extra sleep per prompt of a call")
    p.add_argument("--batch", type=int, default=None, help="teacher.batch_size: requests per caller batch and "
                   "Serve batch (default 16; --quick 4)")
    p.add_argument("--rounds", type=int, default=None, help="full batches per replica (default 4; --quick 2)")
    p.add_argument("--replica-cpus", type=float, default=0.1, help="logical CPUs per replica (it only waits)")
    p.add_argument("--ray-cpus", type=int, default=16, help="logical CPUs of the local Ray (oversubscribed on "
                   "purpose: replicas and callers only wait)")
    p.add_argument("--score", action="store_true", help="also score every sample (embedded student, fresh head)")
    args = p.parse_args(argv)
    apply_threads(args)
    try:
        counts = parse_replicas(args.replicas or ("1,2" if args.quick else "1,2,4,8"))
    except ValueError as err:
        p.error(str(err))
    latency = args.latency_s if args.latency_s is not None else (0.2 if args.quick else 0.5)
    batch = args.batch or (4 if args.quick else 16)
    rounds = args.rounds or (2 if args.quick else 4)
    repeats = repeats_of(args)
    base = ["tracking.enabled=false", f"teacher.batch_size={batch}", "teacher.max_retries=0",
            f"teacher.serve.num_cpus={args.replica_cpus}", f"teacher.serve.port={free_port()}",
            # Enough requests in flight per replica to fill a batch, and no autoscaler in the way.
            f"teacher.serve.max_ongoing_requests={max(batch, 1) * 4}", f"teacher.serve.target_ongoing_requests={batch}"]
    cfg0 = load_run_config(args, base)
    task = load_task(cfg0.task.name)
    factory = functools.partial(LatencyBoundEngine, latency_s=latency, per_prompt_s=args.per_prompt_s)
    result = new_result("scaling", command_line("benchmarks.perf.scaling", argv), {
        "replicas": counts, "latency_s": latency, "per_prompt_s": args.per_prompt_s, "batch": batch,
        "rounds": rounds, "repeats": repeats, "quick": args.quick, "replica_cpus": args.replica_cpus,
        "ray_cpus": args.ray_cpus, "scored": args.score, "engine": "LatencyBoundEngine", "config": args.config,
        "overrides": args.set,
    })
    start_local_ray(args.ray_cpus)
    per_count: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="perf-scale-") as tmp:
        ckpt = None
        if args.score:
            from gold_ray.student.model import build_student

            ckpt = Path(tmp) / "student"
            build_student(task, cfg0.student, resolve_model(cfg0.student.model), device="cpu").save(ckpt)
        for n in counts:
            cfg = load_run_config(args, base + [f"teacher.serve.max_replicas={n}", f"teacher.serve.min_replicas={n}"])
            app = f"perf-scale-{n}"
            log(f"scaling: {n} replica(s)")
            start_teacher(cfg, factory, name=app)
            wait_for_serve_app(app, replicas=n)
            prompts = gold_iteration_prompts(cfg, n * batch * rounds, seed=cfg.seed)
            caller = start_caller(app, task)  # one per run, as a run keeps it
            generate_iteration(prompts[:batch], cfg, task, app, ckpt, Path(tmp) / f"warm-{n}.parquet",
                               dedup=Deduplicator(), caller=caller)
            runs = []
            for r in range(repeats):
                with stopwatch() as t:
                    stats = generate_iteration(prompts, cfg, task, app, ckpt, Path(tmp) / f"r{n}-{r}.parquet",
                                               iteration=r, dedup=Deduplicator(), caller=caller)
                runs.append({"seconds": t["seconds"], "samples": len(prompts), "accepted": stats["accepted"],
                             "errors": stats["rejected_by_reason"].get("error", 0)})
                log(f"  repeat {r}: {len(prompts)} samples in {t['seconds']:.2f}s")
            ray.kill(caller)
            serve.delete(app)
            ideal = n * batch / (latency + args.per_prompt_s * batch)
            sps = summarize([ratio(x["samples"], x["seconds"]) for x in runs])
            per_count[n] = {"samples_per_s": sps, "ideal_samples_per_s": ideal,
                            "fraction_of_ideal": ratio(median_of(sps), ideal), "runs": runs}
    serve.shutdown()
    ray.shutdown()
    eff = efficiencies({n: median_of(m["samples_per_s"]) for n, m in per_count.items()})
    for n, e in eff.items():
        per_count[n]["scaling_efficiency"] = e
    result["metrics"] = {"by_replicas": {str(n): m for n, m in per_count.items()}}
    result["headline"] = {f"scaling_efficiency_{n}": e for n, e in eff.items() if n > 1}
    result["notes"].append("Each measurement is one generate_iteration call: Ray Data start-up is inside it, "
                           "as in a GOLD iteration; more rounds per replica amortise it.")
    rows = [[n, spread_cell(m["samples_per_s"]), m["ideal_samples_per_s"], m["fraction_of_ideal"],
             m["scaling_efficiency"]] for n, m in per_count.items()]
    body = [
        f"## Plumbing scaling: latency-bound engine ({latency}s per call, batch {batch}, {rounds} rounds per "
        f"replica), {repeats} repeat(s)", "",
        markdown_table(["replicas", "samples/s", "ideal samples/s", "of ideal", "efficiency thr(N)/(N thr(1))"],
                       rows),
    ]
    jp, mp = write_result(result, "\n".join(body), args.out)
    log(f"scaling: wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
