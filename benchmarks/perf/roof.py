"""Benchmark 2, the compute roof: measured matmul throughput and the token rates it bounds.

::

    python -m benchmarks.perf.roof [--quick] [--device cpu|cuda] [--model REF] [--out DIR]

Measures torch matmul throughput in fp32 and bf16 (large square matrices: the machine's practical
peak; and one decode-shaped matmul, batch x hidden x intermediate of the teacher, which is what
generation really runs). The teacher's bound is ``peak / (2 * matmul parameters)`` output tokens/s
(:func:`benchmarks.perf.common.matmul_params`); the student's is the same per input token.
When ``<out>/generation.json`` exists, each engine's measured tokens/s is shown as a fraction of
the bound (``generation`` computes the same fractions itself, from one run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.perf.common import (
    add_common_args,
    command_line,
    load_run_config,
    log,
    markdown_table,
    matmul_params,
    median_of,
    new_result,
    ratio,
    read_result,
    repeats_of,
    spread_cell,
    summarize,
    write_result,
)

DTYPES = ("float32", "bfloat16")


def matmul_gflops(dtype: str, device: str, m: int, k: int, n: int, seconds: float = 1.0) -> float:
    """GFLOP/s of ``(m x k) @ (k x n)`` matmuls in ``dtype`` on ``device``, run for about ``seconds``.

    Args:
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        device: ``cpu`` or ``cuda``.
        m: Rows of the left matrix (tokens in flight).
        k: Inner dimension.
        n: Columns of the right matrix.
        seconds: Timed duration (after one warm-up product).

    Returns:
        ``2 m k n`` FLOPs per product times products per second, in units of 1e9.
    """
    import torch

    dt = getattr(torch, dtype)
    a = torch.randn(m, k, device=device).to(dt)
    b = torch.randn(k, n, device=device).to(dt)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        torch.matmul(a, b)
        sync()
        count, t0 = 0, time.perf_counter()
        while True:
            torch.matmul(a, b)
            count += 1
            if count % 4 == 0:
                sync()
                if time.perf_counter() - t0 >= seconds:
                    break
        elapsed = time.perf_counter() - t0
    return 2.0 * m * k * n * count / elapsed / 1e9


def model_matmul_params(model_path: str, causal: bool = True) -> dict[str, Any]:
    """Parameter counts of a model, built on the meta device (no weights loaded).

    Returns:
        ``total`` (unique parameters), ``matmul`` (see :func:`matmul_params`), ``hidden`` and
        ``intermediate`` sizes from the config (None where the config has no such field).
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = (AutoModelForCausalLM if causal else AutoModel).from_config(config)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {
        "total": total,
        "matmul": matmul_params(model),
        "hidden": getattr(config, "hidden_size", None),
        "intermediate": getattr(config, "intermediate_size", None),
    }


def measure_roof(device: str, *, quick: bool, repeats: int, decode_shape: tuple[int, int, int] | None = None
                 ) -> dict[str, Any]:
    """Matmul GFLOP/s per dtype: square peak and (optionally) one decode-shaped product.

    Returns:
        ``{dtype: {"square": summary, "decode": summary or None}}`` plus ``square_size``.
    """
    size = 512 if quick else 2048
    seconds = 0.3 if quick else 2.0
    out: dict[str, Any] = {"square_size": size, "decode_shape": list(decode_shape) if decode_shape else None}
    for dtype in DTYPES:
        log(f"roof: {dtype} {size}x{size} matmuls on {device}")
        square = [matmul_gflops(dtype, device, size, size, size, seconds) for _ in range(repeats)]
        decode = None
        if decode_shape:
            decode = summarize([matmul_gflops(dtype, device, *decode_shape, seconds) for _ in range(repeats)])
        out[dtype] = {"square": summarize(square), "decode": decode}
    return out


def tokens_bound(gflops: float | None, matmul_param_count: int) -> float | None:
    """Tokens/s a model of ``matmul_param_count`` parameters can reach at ``gflops`` (2 FLOPs per
    parameter per token)."""
    return ratio(None if gflops is None else gflops * 1e9, 2.0 * matmul_param_count)


def engine_dtype_name(dtype: str, device: str) -> str:
    """The dtype the engines run in for a configured ``teacher.dtype`` (``auto`` resolved)."""
    from gold_ray.devices import resolve_dtype

    return str(resolve_dtype(dtype, device)).removeprefix("torch.")


def main(argv: list[str] | None = None) -> int:
    """Measure the roof; write ``roof.json`` and ``roof.md``."""
    from gold_ray.models import resolve_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--model", default=None, help="teacher model reference (default: the config's)")
    p.add_argument("--student", default=None, help="student model reference (default: the config's)")
    p.add_argument("--decode-batch", type=int, default=64, help="tokens in flight for the decode-shaped matmul")
    args = p.parse_args(argv)
    cfg = load_run_config(args)
    repeats = repeats_of(args)
    teacher_ref = args.model or cfg.teacher.model
    student_ref = args.student or cfg.student.model
    teacher = model_matmul_params(resolve_model(teacher_ref), causal=True)
    student = model_matmul_params(resolve_model(student_ref), causal=False)
    shape = (args.decode_batch, teacher["hidden"], teacher["intermediate"]) if teacher["intermediate"] else None
    roof = measure_roof(args.device, quick=args.quick, repeats=repeats, decode_shape=shape)
    dtype = engine_dtype_name(cfg.teacher.dtype, args.device)
    result = new_result("roof", command_line("benchmarks.perf.roof", argv), {
        "device": args.device, "teacher": teacher_ref, "student": student_ref, "repeats": repeats,
        "quick": args.quick, "engine_dtype": dtype, "teacher_params": teacher, "student_params": student,
    })
    rows, metrics = [], {"matmul": roof}
    for name in DTYPES:
        peak = median_of(roof[name]["square"])
        metrics[f"teacher_tokens_per_s_bound_{name}"] = tokens_bound(peak, teacher["matmul"])
        metrics[f"student_tokens_per_s_bound_{name}"] = tokens_bound(peak, student["matmul"])
        rows.append([name, spread_cell(roof[name]["square"]), spread_cell(roof[name]["decode"]),
                     metrics[f"teacher_tokens_per_s_bound_{name}"], metrics[f"student_tokens_per_s_bound_{name}"]])
    result["metrics"] = metrics
    result["headline"] = {
        "matmul_gflops_fp32": median_of(roof["float32"]["square"]),
        "matmul_gflops_bf16": median_of(roof["bfloat16"]["square"]),
        "teacher_tokens_per_s_bound": metrics[f"teacher_tokens_per_s_bound_{dtype}"],
    }
    decode_label = f"decode-shaped {shape[0]}x{shape[1]}x{shape[2]} GFLOP/s" if shape else "decode-shaped GFLOP/s"
    body = [
        "## Matmul throughput and token bounds", "",
        markdown_table(["dtype", f"square {roof['square_size']} GFLOP/s", decode_label,
                        f"teacher tok/s bound ({teacher['matmul'] / 1e6:.0f} M matmul params)",
                        f"student tok/s bound ({student['matmul'] / 1e6:.1f} M)"], rows),
        "", f"Engines run in {dtype} here (teacher.dtype={cfg.teacher.dtype}).",
    ]
    gen_path = Path(args.out) / "generation.json"
    if gen_path.is_file():
        gen = read_result(gen_path)
        bound = metrics[f"teacher_tokens_per_s_bound_{dtype}"]
        frac_rows = []
        for variant, m in gen["metrics"].get("variants", {}).items():
            tps = median_of(m.get("output_tokens_per_s"))
            frac_rows.append([variant, tps, ratio(tps, bound)])
        body += ["", f"## Engines as a fraction of the bound (tokens/s from {gen_path.name}, {gen['created']})",
                 "", markdown_table(["variant", "output tok/s", "fraction of bound"], frac_rows)]
    result["notes"].append("The bound counts 2 FLOPs per matmul parameter per token and leaves out attention "
                           "over the context and the prompt (prefill) tokens; generation.md also gives the "
                           "fraction with prompt tokens counted.")
    jp, mp = write_result(result, "\n".join(body), args.out)
    log(f"roof: wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
