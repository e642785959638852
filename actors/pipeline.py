"""One generation iteration as a streaming Ray Data pipeline.

::

    prompt rows ──► teacher_records ──► TeacherCaller ──► EnergyScorer pool ──► driver
                    (Ray tasks that       (one actor for     (only with a       (dedup, ids,
                     forward each batch)   the run: one       checkpoint; the    Parquet)
                                           Serve call per     run's warm
                                           batch, answers     ScorerPool if
                                           parsed in place)   given)

Ray Data's streaming executor runs the stages concurrently, so the first samples are scored
while the teacher is still writing later ones.

Nothing is dropped silently. A teacher failure comes back as a row with ``reject_reason="error"``
and the error text; rows whose teacher call failed (engine error, timeout, or a pipeline crash
such as a replica dying mid-request) are sent again, up to ``teacher.max_retries`` more times
with exponential backoff, before they are written as errors.

Near-duplicates are filtered on the driver after collection, in prompt order, with one
:class:`~gold_ray.teacher.parsing.Deduplicator` (which the caller may seed with the hashes of earlier
iterations): a single pass over the whole iteration is the simplest way to be exact, and the
deduplication itself is cheap next to generation. The price is that a duplicate may have been
scored before it is rejected; its score is then cleared to NaN.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from actors.routing import PREFIX_KEY_KWARG, call_prefix_key
from actors.scoring import SCORE_COLUMN, SCORED_AT_COLUMN, SCORED_BY_COLUMN, ScorerPool, score_dataset
from actors.teacher import (
    DEPLOYMENT_NAME,
    default_sampling,
    generation_to_row,
    params_to_dict,
    prompt_from_dict,
    prompt_to_dict,
)
from gold_ray.config import RunConfig
from gold_ray.run import store
from gold_ray.run.tasks import TaskSpec
from gold_ray.teacher.labelling import read_answer
from gold_ray.teacher.parsing import Deduplicator, parse_generation
from gold_ray.types import Generation, Prompt, SamplingParams

logger = logging.getLogger(__name__)

CALLER_NUM_CPUS = 0.25
"""CPUs reserved by the :class:`TeacherCaller` actor: it only awaits Serve responses, and the
default (one whole CPU) would starve a small CPU cluster."""

FORWARD_NUM_CPUS = 0.0
"""CPUs of one task of the teacher-call stage: none, as it only waits for the caller actor."""

CALLER_MAX_RESTARTS = 3
"""Times Ray restarts a caller actor that died (its node lost); the batches it had in flight come
back as a failed pipeline, which :func:`generate_iteration` retries."""

BATCHES_IN_FLIGHT_PER_REPLICA = 2
"""Caller batches kept in flight per teacher replica: one running, one queued behind it, so a
replica never waits for a caller's round trip between batches."""

MAX_BACKOFF_S = 30.0


def prompt_rows(prompts: list[Prompt]) -> list[dict[str, Any]]:
    """One dataset row per prompt: its index, kind, label, style and the prompt as JSON.

    The prompt travels as a JSON string because chat and continuation prompts have different
    shapes, and Arrow wants one type per column.
    """
    return [
        {
            "prompt_index": i,
            "kind": p.kind,
            "requested_label": p.label or "",
            "style": str(p.meta.get("style") or ""),
            "prompt_json": json.dumps(prompt_to_dict(p)),
        }
        for i, p in enumerate(prompts)
    ]


class TeacherCaller:
    """Sends batches of prompt rows to the teacher, one Serve call per batch
    (:meth:`~actors.teacher.TeacherDeployment.generate_batch`), and parses the answers into record
    rows (:func:`parse_row`). A Ray actor kept for the whole run (:func:`start_caller`).

    One process with one Serve router for every call of a run: the router knows all the calls it
    has in flight, so they spread over the replicas by load (with a router in every forwarding
    task instead, each with one call, 8 batches of 0.5 s on 2 replicas took 4.1 s, as if on one;
    through this actor 3.1 s, where 2.0 is ideal: ``benchmarks/perf/results/scaling.md``), and
    the process starts once per run, not per generate stage (an actor started per stage cost 2.1 s
    and 2.2 CPU-seconds a stage on 2 cores). Ray Data's tasks only forward batches to it
    (:func:`teacher_records`). A failed or timed-out call becomes an ``error`` row for every
    prompt of the batch, which :func:`generate_iteration` retries.

    Args:
        app_name: Serve application holding the teacher deployment.
        task: The task the answers are parsed for.
    """

    def __init__(self, app_name: str, task: TaskSpec):
        self._app_name = app_name
        self._task = task
        self._handle: DeploymentHandle | None = None

    async def records(self, rows: list[dict[str, Any]], params_json: str,
                      request_timeout_s: float | None = None) -> list[dict[str, Any]]:
        """The rows' record rows, in order.

        Args:
            rows: :func:`prompt_rows` rows.
            params_json: The sampling parameters of every request, as JSON.
            request_timeout_s: Give up on the call after this long; None waits.
        """
        if self._handle is None:  # at the first call: the application may still be deploying at start
            self._handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=self._app_name)
        requests = [{"prompt": r["prompt_json"], "params": params_json} for r in rows]
        # The key of the prefix the batch's prompts share: the router sends it to the replica that has it.
        key = call_prefix_key(r["prompt_json"] for r in rows)
        response = self._handle.generate_batch.remote(requests, **({PREFIX_KEY_KWARG: key} if key else {}))
        try:
            replies = await asyncio.wait_for(_awaited(response), request_timeout_s)
        except Exception as err:  # a timeout, a replica that died mid-call: the whole batch failed
            response.cancel()
            failed = generation_to_row(Generation(text="", error=f"{type(err).__name__}: {err}"))
            replies = [failed] * len(requests)
        return [parse_row({**row, **reply}, task=self._task) for row, reply in zip(rows, replies, strict=True)]


async def _awaited(response: Any) -> Any:
    return await response


def start_caller(app_name: str, task: TaskSpec) -> Any:
    """A :class:`TeacherCaller` actor for ``app_name``'s teacher, on this node (kill it when done)."""
    from actors.connect import on_this_node

    return ray.remote(TeacherCaller).options(
        num_cpus=CALLER_NUM_CPUS, max_restarts=CALLER_MAX_RESTARTS, scheduling_strategy=on_this_node(),
    ).remote(app_name, task)


def teacher_records(batch: dict[str, np.ndarray], *, caller: Any, params_json: str,
                    request_timeout_s: float | None = None) -> dict[str, np.ndarray]:
    """Ray Data function: ``batch``'s record rows from the caller actor (:meth:`TeacherCaller.records`)."""
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    records = ray.get(caller.records.remote(rows, params_json, request_timeout_s))
    return {key: np.asarray([r[key] for r in records]) for key in records[0]} if records else {}


def parse_row(row: dict[str, Any], *, task: TaskSpec) -> dict[str, Any]:
    """Turn one prompt row merged with the teacher's answer into a record row (fields or a reject reason).

    Text columns hold ``""`` rather than None so that every block has the same Arrow types.

    Args:
        row: A row with the :func:`prompt_rows` columns and the teacher's ``teacher_*`` keys.
        task: The task to parse for.

    Returns:
        The record row, with ``teacher_failed`` telling whether the call may be retried.
    """
    error = str(row.get("teacher_error") or "")
    text = "" if error else str(row.get("teacher_text") or "")
    out: dict[str, Any] = {
        "prompt_index": int(row["prompt_index"]),
        "kind": row["kind"],
        "requested_label": row.get("requested_label") or "",
        "style": row.get("style") or "",
        "raw_text": text,
        "output_tokens": int(row.get("teacher_tokens") or 0),
        "prompt_tokens": int(row.get("teacher_prompt_tokens") or 0),
        "generated_at": float(row.get("generated_at") or math.nan),
        "teacher_failed": bool(error),
        "reject_reason": "",
        "reject_detail": "",
        "confidence": math.nan,
        "option_logprobs": "",
    }
    for name in (*task.field_names, task.target_key):
        out[name] = ""
    if error:
        out.update(reject_reason="error", reject_detail=error[:2000])
        return out
    prompt = prompt_from_dict(row["prompt_json"])
    if prompt.kind == "classify":
        scores = row.get("teacher_option_logprobs") or ""
        result, confidence = read_answer(task, prompt, text, json.loads(scores) if scores else None)
        out["confidence"] = confidence
        out["option_logprobs"] = scores
        if result.fields is None:
            out.update(reject_reason=result.reason, reject_detail=result.detail)
        else:
            out.update(result.fields)
        return out
    result = parse_generation(task, prompt, text)
    if result.fields is None:
        out.update(reject_reason=result.reason, reject_detail=result.detail)
        return out
    out.update(result.fields)
    if task.is_classification:
        out["label"] = prompt.label or ""
    return out


def batches_in_flight(replicas: int, batches: int) -> int:
    """Teacher calls to keep open at once: ``BATCHES_IN_FLIGHT_PER_REPLICA`` per replica, at most
    one per batch."""
    return max(1, min(batches, replicas * BATCHES_IN_FLIGHT_PER_REPLICA))


def generation_dataset(
    rows: list[dict[str, Any]],
    cfg: RunConfig,
    task: TaskSpec,
    caller: Any,
    checkpoint_dir: str | None,
    params: SamplingParams,
    request_batch_size: int,
    request_timeout_s: float | None = None,
    scorer_pool: ScorerPool | None = None,
) -> ray.data.Dataset:
    """The lazy pipeline for ``rows``: teacher calls, parsing and (with a checkpoint) scoring.

    Args:
        rows: :func:`prompt_rows` output (or a subset of it, on a retry).
        cfg: The run config.
        task: The task.
        caller: The :class:`TeacherCaller` actor (:func:`start_caller`) that calls the teacher.
        checkpoint_dir: Student checkpoint to score with, or None to leave scores NaN.
        params: Sampling parameters of every request.
        request_batch_size: Rows per caller batch; a caller sends a batch's requests at once.
        request_timeout_s: Give up on one request after this long (an error row, retried by
            :func:`generate_iteration`); None waits as long as the request is queued.
        scorer_pool: The run's warm scorers, given ``checkpoint_dir`` as their student; None
            starts a Ray Data actor pool for this dataset (:func:`~actors.scoring.score_dataset`).

    Returns:
        A dataset of record rows (see :func:`parse_row`), plus ``score``/``scored_at`` when scored.
    """
    blocks = max(1, min(len(rows), math.ceil(len(rows) / request_batch_size)))
    in_flight = batches_in_flight(cfg.teacher.serve.max_replicas, blocks)
    ds = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        teacher_records,
        fn_kwargs={"caller": caller, "params_json": json.dumps(params_to_dict(params)),
                   "request_timeout_s": request_timeout_s},
        batch_size=request_batch_size,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=in_flight),
        num_cpus=FORWARD_NUM_CPUS,
    )
    if checkpoint_dir is not None:
        ds = score_dataset(ds, cfg, checkpoint_dir, task, pool=scorer_pool)
    return ds


def block_rows(ds: ray.data.Dataset) -> Iterator[list[dict[str, Any]]]:
    """The dataset's rows, one list per block, as each block arrives.

    The rows of a block arrive together (one teacher call, one scoring batch); counted per block,
    a stage's progress is not sent, and its rate measured, on the first row of such a burst (a
    generate stage showed ``1/64 samples`` and an hour to go, seconds before its end).
    """
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield batch.to_pylist()


def _error_row(row: dict[str, Any], task: TaskSpec, detail: str) -> dict[str, Any]:
    """A record row for a prompt whose teacher call never came back."""
    return parse_row({**row, "teacher_error": detail or "teacher error"}, task=task)


def _collect(
    rows: list[dict[str, Any]],
    make_dataset: Callable[[list[dict[str, Any]]], ray.data.Dataset],
    task: TaskSpec,
    max_retries: int,
    backoff_s: float,
    on_progress: Callable[..., None] | None = None,
) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
    """Run the pipeline, then re-run it on failed prompts (bounded, with backoff).

    Args:
        on_progress: Called as rows arrive, as ``on_progress("samples", done, total, rejected=...,
            scored=...)`` (see :class:`gold_ray.run.runtime.StageProgress`); rejects before deduplication.

    Returns:
        Record rows by prompt index (every prompt present) and retry statistics.
    """
    report = on_progress or (lambda *a, **k: None)
    by_index = {r["prompt_index"]: r for r in rows}
    results: dict[int, dict[str, Any]] = {}
    pending = list(by_index)
    attempts, retried, last_error = 0, 0, ""
    while pending and attempts <= max_retries:
        if attempts:
            retried += len(pending)
            time.sleep(min(MAX_BACKOFF_S, backoff_s * 2 ** (attempts - 1)))
            logger.warning("retrying %d failed teacher requests (attempt %d)", len(pending), attempts + 1)
        attempts += 1
        report("samples", len(results), len(rows), **_counts(results))
        try:
            for block in block_rows(make_dataset([by_index[i] for i in pending])):
                for out in block:
                    results[int(out["prompt_index"])] = out
                report("samples", len(results), len(rows), **_counts(results))
        except Exception as err:  # a crashed pipeline (a replica died mid-call): retry what is missing
            last_error = f"teacher pipeline failed: {type(err).__name__}: {err}"
            logger.warning("%s", last_error.splitlines()[0])
        pending = [i for i in pending if i not in results or results[i]["teacher_failed"]]
    for i in pending:
        if i not in results:
            results[i] = _error_row(by_index[i], task, last_error or "no answer from the teacher")
    return results, {"attempts": attempts, "retried": retried}


def _counts(results: dict[int, dict[str, Any]]) -> dict[str, int]:
    """Rejected and scored rows so far (for progress; a few hundred rows, counted again each time)."""
    rejected = sum(bool(r["reject_reason"]) for r in results.values())
    scored = sum(1 for r in results.values() if _finite([r.get(SCORE_COLUMN)]))
    return {"rejected": rejected, "scored": scored}


def _records(
    results: dict[int, dict[str, Any]], task: TaskSpec, iteration: int, dedup: Deduplicator
) -> Iterator[dict[str, Any]]:
    """Final records in prompt order: ids, duplicates marked, rejected rows without fields.

    Classify answers are not deduplicated: their texts were when they were written or loaded.
    """
    text_cols = (*task.field_names, task.target_key)
    for i in sorted(results):
        row = results[i]
        reason = row["reject_reason"] or None
        detail = row["reject_detail"] or ""
        if reason is None and row["kind"] != "classify" and dedup.seen({name: row[name] for name in task.field_names}):
            reason, detail = "duplicate", "near-duplicate of an accepted sample"
        score = row.get(SCORE_COLUMN)
        yield store.make_record(
            task, iteration=iteration, kind=row["kind"], index=i, requested_label=row["requested_label"],
            raw_text=row["raw_text"], reject_reason=reason, reject_detail=detail,
            fields={name: row[name] for name in text_cols},
            score=float(score) if score is not None else math.nan, output_tokens=row["output_tokens"],
            style=row["style"], confidence=float(row.get("confidence", math.nan)),
            option_logprobs=row.get("option_logprobs"),
        )


def _app_name(handle_or_app_name: DeploymentHandle | str) -> str:
    """The Serve application of the teacher, checked to be running a teacher deployment."""
    if isinstance(handle_or_app_name, str):
        name = handle_or_app_name
    else:
        name = handle_or_app_name.app_name
        if handle_or_app_name.deployment_name != DEPLOYMENT_NAME:
            raise ValueError(
                f"handle points at deployment {handle_or_app_name.deployment_name!r}, not {DEPLOYMENT_NAME!r}"
            )
    # Fail fast: a wrong name would otherwise surface as every row failing after all retries.
    app = serve.status().applications.get(name)
    if app is None or DEPLOYMENT_NAME not in app.deployments:
        raise ValueError(
            f"no Serve application {name!r} with a {DEPLOYMENT_NAME}; start it with start_teacher()"
        )
    return name


def _finite(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def generate_iteration(
    prompts: list[Prompt],
    cfg: RunConfig,
    task: TaskSpec,
    handle_or_app_name: DeploymentHandle | str,
    checkpoint_dir: str | Path | None,
    out_path: str | Path,
    *,
    iteration: int = 0,
    dedup: Deduplicator | None = None,
    params: SamplingParams | None = None,
    request_batch_size: int | None = None,
    request_timeout_s: float | None = None,
    retry_backoff_s: float | None = None,
    on_progress: Callable[..., None] | None = None,
    scorer_pool: ScorerPool | None = None,
    caller: Any = None,
) -> dict[str, Any]:
    """Generate, parse and score one batch of prompts through the teacher deployment; write Parquet.

    Args:
        prompts: The prompts of this iteration (one sample each).
        cfg: The run config (retries and timeouts from ``teacher``, scorer pool from ``resources``,
            score settings from ``strategy``).
        task: The task.
        handle_or_app_name: A handle to the running :class:`~actors.teacher.TeacherDeployment`,
            or the name of its Serve application.
        checkpoint_dir: Student checkpoint for energy scores; None leaves ``score`` NaN.
        out_path: Parquet file written atomically with every row, accepted and rejected, in the
            :func:`gold_ray.run.store.record_schema` layout.
        iteration: Iteration number, used in record ids.
        dedup: The run's deduplicator, updated in place; pass one built from earlier iterations'
            hashes to reject repeats across iterations. None starts an empty one.
        params: Sampling parameters; defaults to the ``teacher`` section's.
        request_batch_size: Requests one caller sends at once; defaults to ``teacher.batch_size``.
        request_timeout_s: Per-request timeout; None (the default) lets requests queue at a busy
            teacher for as long as it takes, since queueing is normal under load.
        retry_backoff_s: First retry delay; doubles per retry (capped at 30 s). Defaults to
            ``teacher.retry_backoff_s``.
        on_progress: Told the samples done of requested, rejects and scores so far as rows arrive
            (the runtime's :attr:`~gold_ray.run.runtime.Runtime.progress`).
        scorer_pool: The run's :class:`~actors.scoring.ScorerPool`: its warm actors score with
            ``checkpoint_dir`` (published once, however often the pipeline is retried). None
            starts scorer actors for this iteration and stops them after it.
        caller: The run's :class:`TeacherCaller` actor for this teacher (:func:`start_caller`);
            None starts one for this call and stops it after.

    Returns:
        Statistics: ``requested``, ``accepted``, ``rejected``, ``rejected_by_reason``,
        ``output_tokens``, ``prompt_tokens``, ``seconds``, ``tokens_per_s``, ``samples_per_s``, ``scored``,
        ``scorer_actors`` (distinct actors that scored), ``attempts`` (pipeline runs),
        ``retried`` (prompts sent again), ``first_scored_at``, ``last_generated_at``,
        ``streamed`` (the first score came before the last generation; None without scoring)
        and ``path``.
    """
    out_path = Path(out_path)
    dedup = dedup if dedup is not None else Deduplicator()
    params = params or default_sampling(cfg.teacher)
    batch = request_batch_size or cfg.teacher.batch_size
    rows = prompt_rows(prompts)
    app_name = _app_name(handle_or_app_name) if rows else ""
    ckpt = str(checkpoint_dir) if checkpoint_dir is not None else None

    t0 = time.perf_counter()
    if rows:
        own = caller is None
        caller = start_caller(app_name, task) if own else caller
        try:
            results, retry_stats = _collect(
                rows,
                lambda subset: generation_dataset(
                    subset, cfg, task, caller, ckpt, params, batch, request_timeout_s, scorer_pool
                ),
                task,
                cfg.teacher.max_retries,
                cfg.teacher.retry_backoff_s if retry_backoff_s is None else retry_backoff_s,
                on_progress,
            )
        finally:
            if own:
                ray.kill(caller)
    else:
        results, retry_stats = {}, {"attempts": 0, "retried": 0}
    seconds = time.perf_counter() - t0

    records = list(_records(results, task, iteration, dedup))
    store.write_part(out_path, task, records)

    accepted = sum(r["reject_reason"] is None for r in records)
    tokens = sum(r["output_tokens"] for r in records)
    generated = _finite(r.get("generated_at") for r in results.values())
    scored_at = _finite(r.get(SCORED_AT_COLUMN) for r in results.values() if _finite([r.get(SCORE_COLUMN)]))
    first_scored = min(scored_at) if scored_at else None
    last_generated = max(generated) if generated else None
    return {
        "requested": len(prompts),
        "accepted": accepted,
        "rejected": len(records) - accepted,
        "rejected_by_reason": dict(Counter(r["reject_reason"] for r in records if r["reject_reason"])),
        "output_tokens": tokens,
        "prompt_tokens": sum(int(r.get("prompt_tokens") or 0) for r in results.values()),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None,
        "samples_per_s": round(len(prompts) / seconds, 3) if seconds > 0 else None,
        "scored": sum(math.isfinite(r["score"]) for r in records),
        "scorer_actors": len({r[SCORED_BY_COLUMN] for r in results.values() if r.get(SCORED_BY_COLUMN)}),
        **retry_stats,
        "first_scored_at": first_scored,
        "last_generated_at": last_generated,
        "streamed": (first_scored < last_generated) if first_scored and last_generated else None,
        "path": str(out_path),
    }
