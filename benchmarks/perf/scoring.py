"""Benchmark 3, energy scoring: the Ray scorer actor pool against a plain single-process loop.

::

    python -m benchmarks.perf.scoring [--quick] [--records 1024] [--repeats 3] [--config demo]
        [--set resources.scorer_max_actors=2 ...] [--out DIR]

Both sides score the same records with the same student checkpoint (the config's student with a
fresh head, saved once: the cost is that of a trained one):

- ``loop``: ``load_student(checkpoint).ood_scores(records)`` in this process (torch's threads);
- ``pool``: the run's warm scorer pool (:class:`actors.scoring.ScorerPool`, what a run on Ray
  uses): its actors start once, on a warm-up call, and every repeat publishes a new checkpoint
  folder to them first, as each GOLD iteration publishes its student (the load and the
  ``ray.put`` are timed), then scores a Ray dataset of the records through
  ``actors.scoring.score_dataset``. The steady rate (rows scored after the first batch, over the
  time from the first batch to the last) is reported next to the wall rate;
- ``cold pool``: ``score_dataset`` without a pool, a Ray Data actor pool started for the one
  dataset, each actor loading the checkpoint (what every iteration paid before the pool was kept).

Both pools run on one private local Ray, with the config's pool size, CPUs per actor and batch size.
Per CPU used: the loop uses torch's thread count; each actor runs ``max(1, floor(num_cpus))``
threads (what Ray sets ``OMP_NUM_THREADS`` to), capped at the machine's logical CPUs. The
student's compute roof is the fp32 matmul peak over ``2 x matmul parameters x tokens per
record`` (real tokens; the padded count is reported too). The scores of both sides are compared
(they must agree: same model, same data).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.perf.common import (
    add_common_args,
    apply_threads,
    command_line,
    load_run_config,
    log,
    markdown_table,
    median_of,
    new_result,
    ratio,
    repeats_of,
    spread_cell,
    start_local_ray,
    stopwatch,
    summarize,
    write_result,
)
from benchmarks.perf.roof import measure_roof, model_matmul_params, tokens_bound


def scoring_records(task: Any, n: int, data_dir: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """``n`` records to score: the task's real evaluation texts when available (repeated to reach
    ``n``), else its seed demos with a running number appended.

    Returns:
        The records and a description of where they came from.
    """
    from gold_ray.student.evaluation import load_eval_records

    base, source = [], "seed demos"
    try:
        path = task.eval_path(data_dir)
        if path is not None and Path(path).is_file():
            base = load_eval_records(task, path)
            source = f"{task.name} evaluation set ({len(base)} records)"
    except FileNotFoundError:
        base = []
    if not base:
        base = [dict(d, text=f"{d.get('text', '')} ({i})") if "text" in d else dict(d)
                for i, d in enumerate(task.seed_demos)]
    return [dict(base[i % len(base)]) for i in range(n)], source


def token_counts(tokenizer: Any, task: Any, records: list[dict[str, Any]], max_length: int, batch: int
                 ) -> tuple[float, float]:
    """Mean real tokens per record and mean tokens actually processed (padded to each batch's longest)."""
    fields = [f.name for f in task.input_fields]
    lengths = []
    for r in records:
        texts = [str(r.get(f) or "") for f in fields]
        enc = tokenizer(*texts[:2], truncation=True, max_length=max_length)
        lengths.append(len(enc["input_ids"]))
    padded = sum(max(lengths[i:i + batch]) * len(lengths[i:i + batch]) for i in range(0, len(lengths), batch))
    return sum(lengths) / len(lengths), padded / len(lengths)


def pool_cpus(actors: int, num_cpus: float, logical_cpus: int) -> int:
    """CPUs a scorer pool computes on: threads per actor (``max(1, floor(num_cpus))``, as Ray sets
    ``OMP_NUM_THREADS``) times actors, at most the machine's logical CPUs."""
    return max(1, min(actors * max(1, math.floor(num_cpus)), logical_cpus))


def steady_rate(scored_at: list[float], batch_rows: dict[float, int]) -> float | None:
    """Rows per second after the first batch: rows of later batches over first-to-last batch time.

    Args:
        scored_at: Distinct batch completion times.
        batch_rows: Rows per completion time.
    """
    times = sorted(set(scored_at))
    if len(times) < 2:
        return None
    rows = sum(batch_rows[t] for t in times[1:])
    return ratio(rows, times[-1] - times[0])


def main(argv: list[str] | None = None) -> int:
    """Time the loop and the pool; write ``scoring.json`` and ``scoring.md``."""
    import numpy as np
    import torch

    from gold_ray.models import resolve_model
    from gold_ray.run.tasks import load_task
    from gold_ray.student.model import build_student, load_student

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--records", type=int, default=None, help="records scored per repeat (default 1024; --quick 32)")
    p.add_argument("--ray-cpus", type=int, default=None, help="logical CPUs of the local Ray (default max(4, cores))")
    p.add_argument("--no-roof", action="store_true", help="skip the matmul roof measurement")
    args = p.parse_args(argv)
    apply_threads(args)
    cfg = load_run_config(args, ["tracking.enabled=false"])
    repeats = repeats_of(args)
    n = args.records or (32 if args.quick else 1024)
    task = load_task(cfg.task.name)
    records, source = scoring_records(task, n, cfg.task.data_dir)
    s, r = cfg.strategy, cfg.resources
    logical = os.cpu_count() or 1
    student_path = resolve_model(cfg.student.model)
    params = model_matmul_params(student_path, causal=False)

    result = new_result("scoring", command_line("benchmarks.perf.scoring", argv), {
        "student": cfg.student.model, "task": cfg.task.name, "records": n, "data": source, "repeats": repeats,
        "quick": args.quick, "score": s.score, "scorer_min_actors": r.scorer_min_actors,
        "scorer_max_actors": r.scorer_max_actors, "scorer_num_cpus": r.scorer_num_cpus,
        "scorer_batch_size": r.scorer_batch_size, "student_params": params, "config": args.config,
        "overrides": args.set,
    })
    with tempfile.TemporaryDirectory(prefix="perf-score-") as tmp:
        ckpt = Path(tmp) / "student"
        build_student(task, cfg.student, student_path, device="cpu").save(ckpt)
        student = load_student(ckpt, task, device="cpu")
        mean_tokens, padded_tokens = token_counts(student.tokenizer, task, records, student.max_length,
                                                  student.eval_batch_size)
        loop_threads = torch.get_num_threads()

        def loop_scores() -> np.ndarray:
            return student.ood_scores(records, score=s.score, temperature=s.energy_temperature, mode=s.energy_mode)

        log(f"scoring: loop over {n} records, {loop_threads} torch thread(s)")
        student.ood_scores(records[:8])
        loop_runs, reference_scores = [], None
        for i in range(repeats):
            with stopwatch() as t:
                reference_scores = loop_scores()
            loop_runs.append(t["seconds"])
            log(f"  repeat {i}: {t['seconds']:.2f}s")

        import ray

        from actors.scoring import SCORE_COLUMN, SCORED_AT_COLUMN, SCORED_BY_COLUMN, ScorerPool, score_dataset

        start_local_ray(args.ray_cpus or max(4, logical))
        blocks = max(1, math.ceil(n / r.scorer_batch_size))
        indexed = [dict(rec, _row=i) for i, rec in enumerate(records)]

        def pool_once(checkpoint: Path, pool: ScorerPool | None) -> dict[str, Any]:
            ds = score_dataset(ray.data.from_items(indexed, override_num_blocks=blocks), cfg, str(checkpoint), task,
                               pool=pool)
            rows = list(ds.iter_rows())
            at = [float(x[SCORED_AT_COLUMN]) for x in rows]
            per_time: dict[float, int] = {}
            for t_ in at:
                per_time[t_] = per_time.get(t_, 0) + 1
            scores = np.full(n, np.nan)
            for x in rows:
                scores[int(x["_row"])] = float(x[SCORE_COLUMN])
            return {"actors": len({x[SCORED_BY_COLUMN] for x in rows}), "steady": steady_rate(at, per_time),
                    "scores": scores}

        def timed_runs(side: str, pool: ScorerPool | None) -> list[dict[str, Any]]:
            runs = []
            for i in range(repeats):
                # A new folder per repeat: the warm pool publishes it as a new student, as each
                # iteration's checkpoint is (same weights, so the scores still match the loop's).
                checkpoint = Path(tmp) / f"{side.replace(' ', '-')}-{i}"
                shutil.copytree(ckpt, checkpoint)
                with stopwatch() as t:
                    out = pool_once(checkpoint, pool)
                diff = float(np.nanmax(np.abs(out["scores"] - reference_scores)))
                runs.append({"seconds": t["seconds"], "actors": out["actors"], "steady_rows_per_s": out["steady"],
                             "max_abs_score_diff_vs_loop": diff, "unscored": int(np.isnan(out["scores"]).sum())})
                log(f"  {side} repeat {i}: {t['seconds']:.2f}s, {out['actors']} actor(s)")
            return runs

        log(f"scoring: pool of {r.scorer_max_actors} warm actors x {r.scorer_num_cpus} CPU")
        with ScorerPool(cfg, task) as pool:
            with stopwatch() as first:
                pool_once(ckpt, pool)  # starts the actors (and Ray Data), once per run
            log(f"  pool first call (starts the actors): {first['seconds']:.2f}s")
            pool_runs = timed_runs("pool", pool)
        log(f"scoring: cold pool of {r.scorer_min_actors or r.scorer_max_actors}-{r.scorer_max_actors} actors "
            f"x {r.scorer_num_cpus} CPU, started per call")
        pool_once(ckpt, None)  # warm-up: Ray Data's first execution imports and starts more than later ones
        cold_runs = timed_runs("cold pool", None)
        ray.shutdown()

    roof = None if args.no_roof else measure_roof("cpu", quick=args.quick, repeats=1)
    peak = median_of(roof["float32"]["square"]) if roof else None
    token_bound = tokens_bound(peak, params["matmul"])
    samples_bound = ratio(token_bound, mean_tokens)

    def side_metrics(runs: list[dict[str, Any]]) -> dict[str, Any]:
        sps = summarize([ratio(n, x["seconds"]) for x in runs])
        steady = summarize([x["steady_rows_per_s"] for x in runs])
        actors = max((x["actors"] for x in runs), default=0)
        cpus = pool_cpus(actors, r.scorer_num_cpus, logical)
        return {"samples_per_s": sps, "steady_samples_per_s": steady, "cpus": cpus, "actors": actors,
                "samples_per_s_per_cpu": ratio(median_of(sps), cpus),
                "steady_samples_per_s_per_cpu": ratio(median_of(steady), cpus),
                "roof_fraction": ratio(median_of(sps), samples_bound), "runs": runs}

    loop_sps = summarize([ratio(n, sec) for sec in loop_runs])
    per_cpu_loop = ratio(median_of(loop_sps), loop_threads)
    warm, cold = side_metrics(pool_runs), side_metrics(cold_runs)
    warm["first_call_seconds"] = first["seconds"]
    result["metrics"] = {
        "loop": {"samples_per_s": loop_sps, "seconds": summarize(loop_runs), "cpus": loop_threads,
                 "samples_per_s_per_cpu": per_cpu_loop, "roof_fraction": ratio(median_of(loop_sps), samples_bound)},
        "pool": warm,
        "cold_pool": cold,
        "tokens_per_record": mean_tokens, "padded_tokens_per_record": padded_tokens,
        "student_samples_per_s_bound": samples_bound, "roof": roof,
    }
    result["headline"] = {
        "scoring_fraction_of_loop": ratio(warm["samples_per_s_per_cpu"], per_cpu_loop),
        "scoring_steady_fraction_of_loop": ratio(warm["steady_samples_per_s_per_cpu"], per_cpu_loop),
        "scoring_cold_pool_fraction_of_loop": ratio(cold["samples_per_s_per_cpu"], per_cpu_loop),
        "scoring_loop_roof_fraction": result["metrics"]["loop"]["roof_fraction"],
        "scoring_pool_roof_fraction": warm["roof_fraction"],
    }
    worst = max((x["max_abs_score_diff_vs_loop"] for x in pool_runs + cold_runs), default=0.0)
    result["notes"] += [
        f"Both pools' scores agree with the loop's to {worst:.2e} (max absolute difference).",
        f"Records average {mean_tokens:.1f} real tokens and {padded_tokens:.1f} processed with padding "
        f"(batches of {student.eval_batch_size} in the loop; the pools pad per scoring batch).",
        f"The warm pool's first call took {first['seconds']:.1f} s (it starts the actors, once per run); every "
        "repeat after it includes publishing a new checkpoint, as each GOLD iteration does. The cold pool's "
        "repeats include starting its actors and loading the checkpoint in each.",
    ]

    def row(name: str, side: dict[str, Any]) -> list[Any]:
        return [name, spread_cell(side["samples_per_s"]), spread_cell(side["steady_samples_per_s"]), side["cpus"],
                side["samples_per_s_per_cpu"], ratio(side["samples_per_s_per_cpu"], per_cpu_loop),
                side["roof_fraction"]]

    rows = [
        ["loop (one process)", spread_cell(loop_sps), "—", loop_threads, per_cpu_loop, 1.0,
         result["metrics"]["loop"]["roof_fraction"]],
        row(f"warm pool ({warm['actors']} actor(s) x {r.scorer_num_cpus} CPU)", warm),
        row(f"cold pool ({cold['actors']} actor(s) x {r.scorer_num_cpus} CPU, started per call)", cold),
    ]
    body = [
        f"## Energy scoring: {cfg.student.model}, {n} records ({source}), {repeats} repeat(s)", "",
        markdown_table(["scorer", "samples/s (wall)", "samples/s (steady)", "CPUs", "samples/s per CPU",
                        "per CPU vs loop", "of student roof"], rows),
        "", f"Student roof: {samples_bound and round(samples_bound)} samples/s (fp32 peak {peak and round(peak)} "
        f"GFLOP/s, {params['matmul'] / 1e6:.1f} M matmul parameters, {mean_tokens:.1f} tokens per record).",
    ]
    jp, mp = write_result(result, "\n".join(body), args.out)
    log(f"scoring: wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
