"""One generation iteration as a streaming Ray Data pipeline.

::

    prompt rows ──► ray.data.llm processor ──► parse (map) ──► EnergyScorer pool ──► driver
                    (ServeDeploymentProcessorConfig                (only with a       (dedup, ids,
                     → TeacherDeployment.generate_rows)             checkpoint)        Parquet)

Ray Data's streaming executor runs the stages concurrently, so the first samples are scored
while the teacher is still writing later ones.

Nothing is dropped silently. A teacher failure comes back as a row with ``reject_reason="error"``
and the error text; rows whose teacher call failed (engine error, timeout, or a pipeline crash
such as a replica dying mid-request) are sent again, up to ``teacher.max_retries`` more times
with exponential backoff, before they are written as errors.

Near-duplicates are filtered on the driver after collection, in prompt order, with one
:class:`~gold_ray.parsing.Deduplicator` (which the caller may seed with the hashes of earlier
iterations): a single pass over the whole iteration is the simplest way to be exact, and the
deduplication itself is cheap next to generation. The price is that a duplicate may have been
scored before it is rejected; its score is then cleared to NaN.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.data.llm import ServeDeploymentProcessorConfig, build_processor
from ray.serve.handle import DeploymentHandle

from actors.scoring import SCORE_COLUMN, SCORED_AT_COLUMN, SCORED_BY_COLUMN, score_dataset
from actors.teacher import DEPLOYMENT_NAME, default_sampling, params_to_dict, prompt_from_dict, prompt_to_dict
from gold_ray import store
from gold_ray.config import RunConfig
from gold_ray.labelling import read_answer
from gold_ray.parsing import Deduplicator, parse_generation
from gold_ray.tasks import TaskSpec
from gold_ray.types import Prompt, SamplingParams

logger = logging.getLogger(__name__)

CALLER_NUM_CPUS = 0.25
"""CPUs reserved by each ``ray.data.llm`` caller actor: it only awaits Serve responses, and the
default (one whole CPU) would starve a small CPU cluster."""

MAP_NUM_CPUS = 0.25
"""CPUs of the light map tasks (request building, parsing)."""

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


def _request(row: dict[str, Any], *, params_json: str) -> dict[str, Any]:
    """Preprocess of the processor: the Serve method and its request for one prompt row."""
    return {
        "method": "generate_rows",
        "request_kwargs": {"prompt": row["prompt_json"], "params": params_json},
    }


def parse_row(row: dict[str, Any], *, task: TaskSpec) -> dict[str, Any]:
    """Turn one processor output row into a record row (fields or a reject reason).

    Handles both the teacher's answers and ``ray.data.llm`` error rows (``__inference_error__``).
    Text columns hold ``""`` rather than None so that every block has the same Arrow types.

    Args:
        row: A row with the :func:`prompt_rows` columns and the teacher's ``teacher_*`` keys.
        task: The task to parse for.

    Returns:
        The record row, with ``teacher_failed`` telling whether the call may be retried.
    """
    prompt = prompt_from_dict(row["prompt_json"])
    error = str(row.get("__inference_error__") or "") or str(row.get("teacher_error") or "")
    text = "" if error else str(row.get("teacher_text") or "")
    out: dict[str, Any] = {
        "prompt_index": int(row["prompt_index"]),
        "kind": row["kind"],
        "requested_label": row.get("requested_label") or "",
        "style": row.get("style") or "",
        "raw_text": text,
        "output_tokens": int(row.get("teacher_tokens") or 0),
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


def generation_dataset(
    rows: list[dict[str, Any]],
    cfg: RunConfig,
    task: TaskSpec,
    app_name: str,
    checkpoint_dir: str | None,
    params: SamplingParams,
    request_batch_size: int,
    request_timeout_s: float | None = None,
) -> ray.data.Dataset:
    """The lazy pipeline for ``rows``: teacher calls, parsing and (with a checkpoint) scoring.

    Args:
        rows: :func:`prompt_rows` output (or a subset of it, on a retry).
        cfg: The run config.
        task: The task.
        app_name: Serve application holding the teacher deployment.
        checkpoint_dir: Student checkpoint to score with, or None to leave scores NaN.
        params: Sampling parameters of every request.
        request_batch_size: Rows per caller batch; a caller sends a batch's requests at once.
        request_timeout_s: Give up on one request after this long (an error row, retried by
            :func:`generate_iteration`); None waits as long as the request is queued.

    Returns:
        A dataset of record rows (see :func:`parse_row`), plus ``score``/``scored_at`` when scored.
    """
    blocks = max(1, min(len(rows), math.ceil(len(rows) / request_batch_size)))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    processor = build_processor(
        ServeDeploymentProcessorConfig(
            deployment_name=DEPLOYMENT_NAME,
            app_name=app_name,
            batch_size=request_batch_size,
            concurrency=cfg.teacher.serve.max_replicas,
            should_continue_on_error=True,
            request_timeout_s=request_timeout_s,
        ),
        preprocess=functools.partial(_request, params_json=json.dumps(params_to_dict(params))),
        preprocess_map_kwargs={"num_cpus": MAP_NUM_CPUS},
        postprocess_map_kwargs={"num_cpus": MAP_NUM_CPUS},
    )
    stage = processor.get_stage_by_name("ServeDeploymentStage")
    stage.map_batches_kwargs = {**stage.map_batches_kwargs, "num_cpus": CALLER_NUM_CPUS}
    ds = processor(ds).map(functools.partial(parse_row, task=task), num_cpus=MAP_NUM_CPUS)
    if checkpoint_dir is not None:
        ds = score_dataset(ds, cfg, checkpoint_dir, task)
    return ds


def _error_row(row: dict[str, Any], task: TaskSpec, detail: str) -> dict[str, Any]:
    """A record row for a prompt whose teacher call never came back."""
    out = {
        "prompt_index": row["prompt_index"],
        "kind": row["kind"],
        "requested_label": row["requested_label"],
        "style": row["style"],
        "raw_text": "",
        "output_tokens": 0,
        "generated_at": math.nan,
        "teacher_failed": True,
        "reject_reason": "error",
        "reject_detail": detail[:2000],
        "confidence": math.nan,
        "option_logprobs": "",
    }
    out.update({name: "" for name in (*task.field_names, task.target_key)})
    return out


def _collect(
    rows: list[dict[str, Any]],
    make_dataset: Callable[[list[dict[str, Any]]], ray.data.Dataset],
    task: TaskSpec,
    max_retries: int,
    backoff_s: float,
) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
    """Run the pipeline, then re-run it on failed prompts (bounded, with backoff).

    Returns:
        Record rows by prompt index (every prompt present) and retry statistics.
    """
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
        try:
            for out in make_dataset([by_index[i] for i in pending]).iter_rows():
                results[int(out["prompt_index"])] = dict(out)
        except Exception as err:  # a crashed pipeline (a replica died mid-call): retry what is missing
            last_error = f"teacher pipeline failed: {type(err).__name__}: {err}"
            logger.warning("%s", last_error.splitlines()[0])
        pending = [i for i in pending if i not in results or results[i]["teacher_failed"]]
    for i in pending:
        if i not in results:
            results[i] = _error_row(by_index[i], task, last_error or "no answer from the teacher")
    return results, {"attempts": attempts, "retried": retried}


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
        score = row.get(SCORE_COLUMN)
        score = float(score) if score is not None else math.nan
        if reason is None and row["kind"] != "classify" and dedup.seen({name: row[name] for name in task.field_names}):
            reason, detail = "duplicate", "near-duplicate of an accepted sample"
        rec = {
            "id": f"it{iteration:03d}-{row['kind']}-{i:05d}",
            "iteration": iteration,
            "kind": row["kind"],
            "requested_label": row["requested_label"] or None,
            "raw_text": row["raw_text"],
            "reject_reason": reason,
            "reject_detail": detail,
            "score": score if reason is None else math.nan,
            "output_tokens": int(row["output_tokens"]),
            "style": row["style"] or None,
            "confidence": float(row.get("confidence", math.nan)),
            "option_logprobs": row.get("option_logprobs") or None,
        }
        if reason is None:
            rec.update({name: row[name] or None for name in text_cols})
        yield rec


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
    retry_backoff_s: float = 1.0,
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
            :func:`gold_ray.store.record_schema` layout.
        iteration: Iteration number, used in record ids.
        dedup: The run's deduplicator, updated in place; pass one built from earlier iterations'
            hashes to reject repeats across iterations. None starts an empty one.
        params: Sampling parameters; defaults to the ``teacher`` section's.
        request_batch_size: Requests one caller sends at once; defaults to ``teacher.batch_size``.
        request_timeout_s: Per-request timeout; None (the default) lets requests queue at a busy
            teacher for as long as it takes, since queueing is normal under load.
        retry_backoff_s: First retry delay; doubles per retry (capped at 30 s).

    Returns:
        Statistics: ``requested``, ``accepted``, ``rejected``, ``rejected_by_reason``,
        ``output_tokens``, ``seconds``, ``tokens_per_s``, ``samples_per_s``, ``scored``,
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
        results, retry_stats = _collect(
            rows,
            lambda subset: generation_dataset(
                subset, cfg, task, app_name, ckpt, params, batch, request_timeout_s
            ),
            task,
            cfg.teacher.max_retries,
            retry_backoff_s,
        )
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
