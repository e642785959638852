"""Benchmark 1, teacher generation: the GOLD authors' way, our engines, and the whole Ray pipeline.

::

    python -m benchmarks.perf.generation [--quick] [--samples 256] [--repeats 3] [--device cpu]
        [--variants reference,hf,vllm,pipeline] [--config demo] [--set teacher.model=...] [--out DIR]

Same model, same prompts (one GOLD iteration of SST-2 prompts rendered by ``gold_ray.teacher.prompts``:
training prompts, then probe prompts), same machine, one run:

(a) ``reference``: the GOLD authors' way: a transformers ``text-generation`` pipeline called once
    per sample, sequentially, ``do_sample=True, top_k=10``, no temperature or top_p given (the
    model's generation config applies). Their ``max_length=4000`` is replaced by our
    ``max_new_tokens`` so every variant has the same output cap (``--reference-max-length 4000``
    restores theirs).
(b) ``hf``: :class:`gold_ray.teacher.hf_engine.HFEngine` called directly with the config's settings.
(c) ``vllm``: :class:`gold_ray.teacher.vllm_engine.VLLMEngine` called directly; skipped, with the reason
    recorded, when vLLM does not import.
(d) ``pipeline``: :func:`actors.pipeline.generate_iteration` on a private local Ray: the teacher
    as a Serve deployment (the config's engine), the run's ``TeacherCaller`` actor (one Serve call per
    batch, parsing in place), and energy scoring of every accepted sample by the run's warm scorer
    pool (:class:`actors.scoring.ScorerPool`, started once, as a run starts it; a fresh, untrained
    student checkpoint: same cost as a trained one).

Variants run one after another (load, one untimed warm-up call, the timed repeats, release), so
a large GPU model never has two copies in memory. Reported per variant: samples/s and output
tokens/s (median and spread over repeats), each as a ratio to (a); (d) as a fraction of the best
direct engine; and every variant as a fraction of the compute roof measured in the same run
(``benchmarks.perf.roof``), counting output tokens only and counting prompt tokens too.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import tempfile
from collections.abc import Callable
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
    spread_cell,
    start_local_ray,
    stopwatch,
    summarize,
    wait_for_serve_app,
    write_result,
)
from benchmarks.perf.roof import engine_dtype_name, measure_roof, model_matmul_params, tokens_bound

VARIANTS = ("reference", "hf_generate", "hf", "vllm", "pipeline")
LABELS = {
    "reference": "(a) GOLD authors' way (pipeline per sample, top_k=10)",
    "hf_generate": "(b0) hf engine with transformers generate (before the decode loop)",
    "hf": "(b) hf engine, direct",
    "vllm": "(c) vllm engine, direct",
    "pipeline": "(d) gold-ray pipeline on Ray (Serve, Data, parse, score)",
}
DIRECT_ENGINES = ("hf", "vllm")

RunFn = Callable[[list[Any]], dict[str, Any]]
"""Generates for a list of prompts; returns ``output_tokens``, ``errors`` and ``generations``."""


def variant_metrics(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-repeat ``seconds``, ``samples`` and ``output_tokens`` turned into rate summaries.

    Args:
        runs: One dict per repeat with ``seconds``, ``samples`` and ``output_tokens``.

    Returns:
        ``samples_per_s``, ``output_tokens_per_s`` and ``seconds`` summaries (see
        :func:`~benchmarks.perf.common.summarize`) and ``output_tokens_per_sample``.
    """
    sps = [ratio(r["samples"], r["seconds"]) for r in runs]
    tps = [ratio(r["output_tokens"], r["seconds"]) for r in runs]
    per_sample = [ratio(r["output_tokens"], r["samples"]) for r in runs]
    return {
        "samples_per_s": summarize(sps),
        "output_tokens_per_s": summarize(tps),
        "seconds": summarize([r["seconds"] for r in runs]),
        "output_tokens_per_sample": summarize(per_sample),
        "runs": runs,
    }


def compare_variants(variants: dict[str, dict[str, Any]], bound: float | None,
                     prompt_tokens_per_sample: float | None) -> dict[str, dict[str, Any]]:
    """Ratios from the medians of one run: each variant against (a), (d) against the best engine,
    every variant against the roof.

    Args:
        variants: :func:`variant_metrics` output by variant name (skipped variants absent).
        bound: Output tokens/s the compute roof allows (None: not measured).
        prompt_tokens_per_sample: Mean prompt tokens, to count prefill work against the roof too.

    Returns:
        Per variant: ``samples_ratio_vs_reference``, ``tokens_ratio_vs_reference``,
        ``fraction_of_best_engine`` (samples/s), ``roof_fraction_output`` and
        ``roof_fraction_processed`` (prompt plus output tokens).
    """
    ref = variants.get("reference", {})
    ref_sps, ref_tps = median_of(ref.get("samples_per_s")), median_of(ref.get("output_tokens_per_s"))
    best = max((median_of(variants[v]["samples_per_s"]) or 0.0 for v in DIRECT_ENGINES if v in variants),
               default=0.0) or None
    out = {}
    for name, m in variants.items():
        sps, tps = median_of(m["samples_per_s"]), median_of(m["output_tokens_per_s"])
        processed = None
        if tps is not None and sps is not None and prompt_tokens_per_sample is not None:
            processed = tps + sps * prompt_tokens_per_sample
        out[name] = {
            "samples_ratio_vs_reference": ratio(sps, ref_sps),
            "tokens_ratio_vs_reference": ratio(tps, ref_tps),
            "fraction_of_best_engine": ratio(sps, best),
            "roof_fraction_output": ratio(tps, bound),
            "roof_fraction_processed": ratio(processed, bound),
        }
    return out


def headline(variants: dict[str, dict[str, Any]], comparison: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The numbers ``summary.py`` collects: (d) against (a) and against the best engine, and the
    best direct engine's fraction of the roof."""
    direct = [v for v in DIRECT_ENGINES if v in variants]
    best = max(direct, key=lambda v: median_of(variants[v]["samples_per_s"]) or 0.0) if direct else None
    pipe = comparison.get("pipeline", {})
    return {
        "ratio_vs_reference": pipe.get("samples_ratio_vs_reference"),
        "best_engine_ratio_vs_reference": comparison[best]["samples_ratio_vs_reference"] if best else None,
        "pipeline_fraction_of_engine": pipe.get("fraction_of_best_engine"),
        "teacher_roof_fraction": comparison[best]["roof_fraction_output"] if best else None,
        "pipeline_roof_fraction": pipe.get("roof_fraction_output"),
    }


# --- the variants ---------------------------------------------------------------------------------


def _direct(engine: Any, params: Any) -> RunFn:
    def run(prompts: list[Any]) -> dict[str, Any]:
        gens = engine.generate(prompts, params)
        return {"output_tokens": sum(g.output_tokens for g in gens), "errors": sum(g.error is not None for g in gens),
                "generations": gens}

    return run


def generate_engine(model_path: str, **kwargs: Any) -> Any:
    """An :class:`~gold_ray.teacher.hf_engine.HFEngine` whose batches go through transformers' ``generate``,
    as the engine did before :mod:`gold_ray.teacher.decoding` (full-vocabulary top-p sort and finished
    rows kept in the batch): the baseline the decode loop is measured against."""
    import torch

    from gold_ray.teacher.decoding import left_padded
    from gold_ray.teacher.engines import truncate_at_stop
    from gold_ray.teacher.hf_engine import HFEngine
    from gold_ray.types import Generation

    class GenerateEngine(HFEngine):
        def _generate_batch(self, rows, stops, params, prefix_lens=None):  # noqa: ANN001, ANN202 (benchmark-only)
            # The baseline predates shared prefixes: prefix_lens is ignored.
            pad = self.tokenizer.pad_token_id
            ids, mask = left_padded(rows, pad, self.device)
            width = ids.shape[1]
            extra = {"stop_strings": list(stops), "tokenizer": self.tokenizer} if stops else {}
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=params.max_new_tokens, pad_token_id=pad,
                    eos_token_id=self._stop_ids, do_sample=True, temperature=params.temperature,
                    top_p=params.top_p, top_k=params.top_k, **extra)
            gens = []
            for row in out[:, width:].tolist():
                n = next((k for k, tok in enumerate(row) if tok in self._stop_ids), len(row))
                text = truncate_at_stop(self.tokenizer.decode(row[:n], skip_special_tokens=True), stops)
                gens.append(Generation(text=text, output_tokens=n))
            return gens

    return GenerateEngine(model_path, **kwargs)


def reference_runner(model_path: str, dtype: str, device: str, max_new_tokens: int, max_length: int | None,
                     seed: int) -> tuple[RunFn, Callable[[], None], dict[str, Any]]:
    """The GOLD authors' generation: one ``text-generation`` pipeline call per sample, in order.

    Prompts are rendered exactly as our engines render them (chat template plus prefill) and
    passed as one string each, as the authors pass theirs. Output tokens are counted by
    re-tokenizing each answer.

    Returns:
        The run function, a close function and the sampling settings in effect.
    """
    import torch
    import transformers
    from transformers import pipeline

    from gold_ray.devices import resolve_dtype
    from gold_ray.teacher.engines import render_prompt_text
    from gold_ray.types import Generation

    transformers.logging.set_verbosity_error()  # one "max_length and max_new_tokens" warning per sample
    torch.manual_seed(seed)
    pipe = pipeline("text-generation", model=model_path, dtype=resolve_dtype(dtype, device), device=device)
    tok = pipe.tokenizer
    gen_cfg = pipe.model.generation_config
    kwargs: dict[str, Any] = {"do_sample": True, "top_k": 10, "num_return_sequences": 1, "return_full_text": False}
    if max_length is not None:
        kwargs["max_length"] = max_length
    else:
        kwargs["max_new_tokens"] = max_new_tokens
    if tok.pad_token_id is None:
        kwargs["pad_token_id"] = tok.eos_token_id

    def run(prompts: list[Any]) -> dict[str, Any]:
        gens = []
        for prompt in prompts:
            try:
                text = pipe(render_prompt_text(tok, prompt), **kwargs)[0]["generated_text"]
                n = len(tok(text, add_special_tokens=False)["input_ids"])
                gens.append(Generation(text=text, output_tokens=n))
            except Exception as err:  # noqa: BLE001 - a failed sample is counted, not fatal
                gens.append(Generation(text="", error=f"{type(err).__name__}: {err}"))
        return {"output_tokens": sum(g.output_tokens for g in gens), "errors": sum(g.error is not None for g in gens),
                "generations": gens}

    settings = {**{k: v for k, v in kwargs.items() if k != "return_full_text"},
                "temperature_from_generation_config": getattr(gen_cfg, "temperature", None),
                "top_p_from_generation_config": getattr(gen_cfg, "top_p", None)}
    return run, lambda: None, settings


def time_variant(run: RunFn, prompts: list[Any], repeats: int, task: Any, warmup: int) -> dict[str, Any]:
    """One untimed warm-up call on ``warmup`` prompts, then ``repeats`` timed calls on all of them.

    Accepted share (parse and dedup, untimed) is recorded per repeat, so a variant that writes
    more unusable samples shows it.
    """
    from gold_ray.teacher.parsing import Deduplicator, parse_batch

    if warmup:
        run(prompts[:warmup])
    runs = []
    first_error = None
    for r in range(repeats):
        with stopwatch() as t:
            out = run(prompts)
        accepted = None
        if out.get("generations") is not None:
            first_error = first_error or next((g.error for g in out["generations"] if g.error), None)
            results = parse_batch(task, prompts, out["generations"], Deduplicator())
            accepted = sum(x.fields is not None for x in results)
        elif out.get("accepted") is not None:
            accepted = out["accepted"]
        runs.append({"repeat": r, "seconds": t["seconds"], "samples": len(prompts),
                     "output_tokens": out["output_tokens"], "errors": out["errors"], "accepted": accepted,
                     **out.get("extra", {})})
        log(f"  repeat {r}: {len(prompts)} samples in {t['seconds']:.1f}s, {out['output_tokens']} output tokens")
        if out["errors"] == len(prompts):
            # A variant that only failed has no speed to report; a 0-second "run" would read as one.
            raise RuntimeError(f"every sample of this variant failed, e.g.: {first_error or 'no error text'}")
    return variant_metrics(runs)


def pipeline_runner(cfg: Any, task: Any, workdir: Path, score: bool, ray_cpus: int
                    ) -> tuple[RunFn, Callable[[], None], dict[str, Any]]:
    """(d): the Serve teacher and :func:`actors.pipeline.generate_iteration` on a private local Ray."""
    import ray
    from ray import serve

    from actors.pipeline import generate_iteration, start_caller
    from actors.teacher import start_teacher
    from gold_ray.teacher.parsing import Deduplicator

    start_local_ray(ray_cpus)
    app = "perf-teacher"
    handle = start_teacher(cfg, name=app)
    wait_for_serve_app(app)
    ckpt = pool = None
    if score:
        from actors.scoring import ScorerPool
        from gold_ray.models import resolve_model
        from gold_ray.student.model import build_student

        ckpt = workdir / "student-ckpt"
        build_student(task, cfg.student, resolve_model(cfg.student.model), device="cpu").save(ckpt)
        # A run keeps its scorers for its whole length (the untimed warm-up call starts them).
        pool = ScorerPool(cfg, task)
    caller = start_caller(app, task)  # a run keeps one for its whole length
    calls = {"n": 0}

    def run(prompts: list[Any]) -> dict[str, Any]:
        calls["n"] += 1
        before = len(handle.batch_size_history.remote().result())
        stats = generate_iteration(prompts, cfg, task, app, ckpt, workdir / f"it{calls['n']}.parquet",
                                   iteration=calls["n"], dedup=Deduplicator(), scorer_pool=pool, caller=caller)
        sizes = handle.batch_size_history.remote().result()[before:]
        extra = {"scored": stats["scored"], "scorer_actors": stats["scorer_actors"], "streamed": stats["streamed"],
                 "retried": stats["retried"], "engine_batches": len(sizes),
                 "mean_engine_batch": (sum(sizes) / len(sizes)) if sizes else None}
        errors = stats["rejected_by_reason"].get("error", 0)
        return {"output_tokens": stats["output_tokens"], "errors": errors, "accepted": stats["accepted"],
                "extra": extra}

    def close() -> None:
        if pool is not None:
            pool.close()
        ray.kill(caller)
        serve.delete(app)
        serve.shutdown()
        ray.shutdown()

    settings = {"ray_cpus": ray_cpus, "scored": score, "replica_num_cpus": cfg.teacher.serve.num_cpus,
                "replicas": [cfg.teacher.serve.min_replicas, cfg.teacher.serve.max_replicas],
                "serve_max_batch": min(cfg.teacher.batch_size, cfg.teacher.serve.max_ongoing_requests),
                "engine": cfg.teacher.engine}
    return run, close, settings


# --- main -----------------------------------------------------------------------------------------


def demo_set_comparison(args: argparse.Namespace, argv: list[str] | None, cfg: Any, model_path: str, params: Any,
                        task: Any, sizes: list[int], n: int, repeats: int, warmup: int) -> int:
    """The ``hf`` engine on the demo's prompts drawn with each ``teacher.prompts_per_demo_set`` of
    ``sizes``, arms interleaved in one run; writes ``generation_prefix.json`` and ``.md``.

    One engine serves every arm. Each repeat times every arm once, in alternating order, so a load
    change on the machine falls on all arms alike; the ratios compare medians of this one run.
    """
    import torch

    from gold_ray.teacher.engines import prompt_token_ids
    from gold_ray.teacher.hf_engine import HFEngine

    engine = HFEngine(model_path, dtype=cfg.teacher.dtype, batch_size=cfg.teacher.batch_size, seed=cfg.seed,
                      device=args.device)
    arms = {}
    for g in sizes:
        arm_cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"prompts_per_demo_set": g})})
        arms[g] = gold_iteration_prompts(arm_cfg, n, feedback=args.feedback, seed=cfg.seed)
    lens = {g: [len(prompt_token_ids(engine.tokenizer, p)) for p in ps] for g, ps in arms.items()}
    run = _direct(engine, params)
    for g in sizes:
        run(arms[g][:warmup])
    from gold_ray.teacher.parsing import Deduplicator, parse_batch

    runs: dict[int, list[dict[str, Any]]] = {g: [] for g in sizes}
    try:
        for r in range(repeats):
            for g in sizes if r % 2 == 0 else list(reversed(sizes)):
                with stopwatch() as t:
                    out = run(arms[g])
                results = parse_batch(task, arms[g], out["generations"], Deduplicator())
                runs[g].append({"repeat": r, "seconds": t["seconds"], "samples": n,
                                "output_tokens": out["output_tokens"], "errors": out["errors"],
                                "accepted": sum(x.fields is not None for x in results)})
                log(f"  prompts_per_demo_set={g}, repeat {r}: {n} samples in {t['seconds']:.1f}s")
    finally:
        engine.close()
    arms_metrics = {str(g): {**variant_metrics(runs[g]), "prompt_tokens_mean": sum(lens[g]) / len(lens[g]),
                             "demo_sets": len({p.meta.get("prefix_key") for p in arms[g]})} for g in sizes}
    base = median_of(arms_metrics[str(sizes[0])]["samples_per_s"])
    ratios = {str(g): ratio(median_of(arms_metrics[str(g)]["samples_per_s"]), base) for g in sizes}
    result = new_result("generation_prefix", command_line("benchmarks.perf.generation", argv), {
        "teacher": cfg.teacher.model, "task": cfg.task.name, "device": args.device, "samples": n,
        "repeats": repeats, "quick": args.quick, "warmup_prompts": warmup, "feedback_in_prompts": args.feedback,
        "prompts_per_demo_set": sizes, "teacher_batch_size": cfg.teacher.batch_size,
        "sampling": dataclasses.asdict(params), "torch_threads": torch.get_num_threads(), "config": args.config,
        "overrides": args.set,
    })
    result["metrics"] = {"arms": arms_metrics, "samples_ratio_vs_first": ratios}
    result["headline"] = {f"hf_prefix_speedup_{g}_vs_{sizes[0]}": ratios[str(g)] for g in sizes[1:]}
    result["notes"] += [
        "One hf engine, the same number of SST-2 GOLD prompts per arm (training then probes), drawn with each "
        "teacher.prompts_per_demo_set; the arms run interleaved (alternating order per repeat), so the ratios "
        "compare medians of the same run.",
        "The machine may be loaded by other work while this runs (the load average at the start is recorded): "
        "absolute samples/s are not comparable with other runs, only the ratios inside this one.",
        "Accepted share is parsing only; whether grouped demo sets cost quality is the quality benchmark's question.",
    ]
    rows = [[g, spread_cell(arms_metrics[str(g)]["samples_per_s"]), spread_cell(arms_metrics[str(g)]["output_tokens_per_s"]),
             ratios[str(g)], arms_metrics[str(g)]["demo_sets"], round(arms_metrics[str(g)]["prompt_tokens_mean"]),
             sum(x["accepted"] for x in runs[g]) / sum(x["samples"] for x in runs[g])] for g in sizes]
    body = [
        f"## hf engine, prompts sharing demo sets: {cfg.teacher.model} on {args.device}, {n} prompts per arm "
        f"(batch {cfg.teacher.batch_size}), {repeats} interleaved repeat(s)", "",
        markdown_table(["prompts_per_demo_set", "samples/s", "output tok/s", f"x ({sizes[0]}) samples/s",
                        "distinct demo sets", "prompt tokens (mean)", "accepted share"], rows),
    ]
    jp, mp = write_result(result, "\n".join(body), args.out)
    log(f"generation: wrote {jp} and {mp}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the chosen variants; write ``generation.json`` and ``generation.md`` (with ``--demo-sets``:
    the demo-set comparison instead, :func:`demo_set_comparison`)."""
    import os

    import torch

    from actors.teacher import default_sampling
    from gold_ray.models import resolve_model
    from gold_ray.run.tasks import load_task
    from gold_ray.teacher.engines import prompt_token_ids
    from gold_ray.teacher.hf_engine import HFEngine
    from gold_ray.teacher.vllm_engine import VLLMEngine

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--samples", type=int, default=None, help="prompts per timed call (default 256; --quick 6)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--device", default="cpu", help="cpu or cuda (direct engines and the roof)")
    p.add_argument("--feedback", type=int, default=0,
                   help="feedback examples in the prompts (0: iteration 0; 3+: as long as later iterations)")
    p.add_argument("--reference-max-length", type=int, default=None,
                   help="use the authors' max_length (e.g. 4000) instead of our max_new_tokens for (a)")
    p.add_argument("--no-score", action="store_true", help="(d) without energy scoring")
    p.add_argument("--no-roof", action="store_true", help="skip the matmul roof measurement")
    p.add_argument("--ray-cpus", type=int, default=None, help="logical CPUs of the local Ray (default max(4, cores))")
    p.add_argument("--demo-sets", default=None, metavar="1,8",
                   help="instead of the variants: the hf engine with these teacher.prompts_per_demo_set values, "
                        "interleaved (writes generation_prefix.json/.md)")
    args = p.parse_args(argv)
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    apply_threads(args)
    extra = ["tracking.enabled=false", f"teacher.serve.port={free_port()}"]
    extra += ["teacher.max_new_tokens=16"] if args.quick else []
    cfg = load_run_config(args, extra)
    repeats = repeats_of(args)
    n = args.samples or (4 if args.quick else 256)
    task = load_task(cfg.task.name)
    model_path = resolve_model(cfg.teacher.model)
    params = default_sampling(cfg.teacher)
    hf_dtype = engine_dtype_name(cfg.teacher.dtype, args.device)
    ray_cpus = args.ray_cpus or max(4, os.cpu_count() or 1)
    warmup = 1 if args.quick else min(4, n)
    if args.demo_sets:
        try:
            sizes = [int(x) for x in args.demo_sets.split(",") if x.strip()]
        except ValueError:
            p.error(f"--demo-sets: comma-separated whole numbers, got {args.demo_sets!r}")
        if len(sizes) < 2 or min(sizes) < 1:
            p.error("--demo-sets: at least two values, each >= 1 (e.g. 1,8)")
        return demo_set_comparison(args, argv, cfg, model_path, params, task, sizes, n, repeats, warmup)
    prompts = gold_iteration_prompts(cfg, n, feedback=args.feedback, seed=cfg.seed)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    prompt_lens = [len(prompt_token_ids(tok, pr)) for pr in prompts]
    prompt_tokens = sum(prompt_lens) / len(prompt_lens)
    teacher_params = model_matmul_params(model_path)

    result = new_result("generation", command_line("benchmarks.perf.generation", argv), {
        "teacher": cfg.teacher.model, "task": cfg.task.name, "device": args.device, "samples": n,
        "repeats": repeats, "quick": args.quick, "warmup_prompts": warmup, "feedback_in_prompts": args.feedback,
        "probe_prompts": sum(pr.kind == "probe" for pr in prompts), "sampling": dataclasses.asdict(params),
        "engine_dtype": hf_dtype, "teacher_batch_size": cfg.teacher.batch_size,
        "prompt_tokens_mean": prompt_tokens, "prompt_tokens_max": max(prompt_lens),
        "teacher_params": teacher_params, "torch_threads": torch.get_num_threads(), "config": args.config,
        "overrides": args.set,
    })
    roof = None
    bound = None
    if not args.no_roof:
        roof = measure_roof(args.device, quick=args.quick, repeats=1)
        bound = tokens_bound(median_of(roof[hf_dtype]["square"]) if hf_dtype in roof else None,
                             teacher_params["matmul"])
    variants: dict[str, dict[str, Any]] = {}
    settings: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="perf-gen-") as tmp:
        for name in chosen:
            log(f"generation: {LABELS[name]}")
            close: Callable[[], None] = lambda: None  # noqa: E731
            try:
                if name == "reference":
                    run, close, settings[name] = reference_runner(
                        model_path, cfg.teacher.dtype, args.device, cfg.teacher.max_new_tokens,
                        args.reference_max_length, cfg.seed)
                elif name in ("hf", "hf_generate"):
                    make = generate_engine if name == "hf_generate" else HFEngine
                    engine = make(model_path, dtype=cfg.teacher.dtype, batch_size=cfg.teacher.batch_size,
                                      seed=cfg.seed, device=args.device)
                    run, close = _direct(engine, params), engine.close
                    settings[name] = {"batch_size": cfg.teacher.batch_size, "dtype": str(engine.dtype)}
                elif name == "vllm":
                    try:
                        engine = VLLMEngine(model_path, dtype=cfg.teacher.dtype, seed=cfg.seed)
                    except ImportError as err:
                        result["skipped"]["vllm"] = f"vLLM does not import here: {err.__cause__ or err}"
                        log(f"  skipped: {result['skipped']['vllm']}")
                        continue
                    run, close = _direct(engine, params), engine.close
                    settings[name] = {"dtype": cfg.teacher.dtype}
                else:
                    run, close, settings[name] = pipeline_runner(cfg, task, Path(tmp), not args.no_score, ray_cpus)
                try:
                    variants[name] = time_variant(run, prompts, repeats, task, warmup)
                except RuntimeError as err:  # the other variants still run; the reason is printed with them
                    result["skipped"][name] = f"failed: {err}"
                    log(f"  {result['skipped'][name]}")
            finally:
                close()
                # Drop the last variant's model before the next one loads (a GPU holds one at a time).
                run = None  # noqa: F841
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    comparison = compare_variants(variants, bound, prompt_tokens)
    result["params"]["variant_settings"] = settings
    result["metrics"] = {"variants": variants, "comparison": comparison, "roof": roof,
                         "teacher_tokens_per_s_bound": bound}
    result["headline"] = headline(variants, comparison)
    result["notes"] += [
        "Ratios compare medians from this run. Roof fractions use the square-matmul peak of the engines' dtype "
        "and 2 FLOPs per matmul parameter per token; 'processed' also counts the prompt tokens every sample "
        f"prefills (mean {prompt_tokens:.0f}).",
        "(d) includes Ray Data's start-up each call, as every generate stage pays it; the scorer pool is the "
        "run's warm one (started by the untimed warm-up call, once per run), and each call scores with it.",
    ]
    rows = []
    for name in chosen:
        if name not in variants:
            rows.append([LABELS[name], "skipped", "", "", "", "", "", "", ""])
            continue
        m, c = variants[name], comparison[name]
        acc = [r["accepted"] / r["samples"] for r in m["runs"] if r.get("accepted") is not None]
        rows.append([LABELS[name], spread_cell(m["samples_per_s"]), spread_cell(m["output_tokens_per_s"]),
                     c["samples_ratio_vs_reference"], c["tokens_ratio_vs_reference"], c["fraction_of_best_engine"],
                     c["roof_fraction_output"], c["roof_fraction_processed"],
                     sum(acc) / len(acc) if acc else None])
    body = [
        f"## Teacher generation: {cfg.teacher.model} on {args.device}, {n} SST-2 prompts "
        f"({result['params']['probe_prompts']} probes), {repeats} repeat(s)", "",
        markdown_table(["variant", "samples/s", "output tok/s", "x (a) samples/s", "x (a) tok/s",
                        "of best engine", "of roof (output)", "of roof (prompt+output)", "accepted share"], rows),
        "",
        (f"Roof: {round(bound)} output tok/s ({hf_dtype})" if bound else "Roof: not measured")
        + f"; prompts average {prompt_tokens:.0f} tokens, "
        f"output is capped at {cfg.teacher.max_new_tokens}.",
    ]
    jp, mp = write_result(result, "\n".join(body), args.out)
    log(f"generation: wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
