"""The run report: one self-contained ``report.html`` per run directory, and a two-run comparison.

:func:`write_report` reads a run directory (see :mod:`gold_ray.run.store`) and writes
``RUN_DIR/report.html``: the final and per-iteration metrics, plots (accuracy per iteration,
energy distributions per iteration with the feedback band, label balance of the accepted data,
reject reasons, throughput per stage), samples of accepted, feedback and rejected data side by
side, and the config. :func:`write_comparison` puts two runs in one page.

The page needs no server and no network: the plots are PNG files (matplotlib, Agg) inlined as
base64 ``data:`` URIs and the style sheet is inline. Everything read from the run (generated text
above all, which is untrusted) is HTML-escaped.

The loop writes the report at the end of every run (in process and on Ray); ``gold-ray report
RUN_DIR`` rebuilds it, also for a run that is still going or was interrupted.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gold_ray.config import StrategyConfig
from gold_ray.reporting.plots import (
    figure_png,
    grid_figure,
    mark_empty,
    plot_energy_band,
    plot_grouped_bars,
    plot_iteration_series,
    plot_stacked_bars,
)
from gold_ray.reporting.progress import quality, scoring_rate
from gold_ray.run import store
from gold_ray.run.rundir import RunReadError, run_config, run_task
from gold_ray.run.tasks import TaskSpec

# Runs that recorded no band drew it with the config's defaults: read them there, not as literals.
BAND_DEFAULTS = (StrategyConfig.model_fields["band_lo"].default, StrategyConfig.model_fields["band_hi"].default)

REPORT_FILE = "report.html"
SAMPLE_PARTS = ("train-", "probe-", "rejects-")
"""Name prefixes of the data parts the report reads."""
SAMPLES_PER_COLUMN = 6
MAX_TARGET_VALUES = 8
"""Text-to-text answers shown by value in the balance plot; the rest are ``other``."""
MAX_ENERGY_PANELS = 9
"""Iterations shown in the energy plot (spread over the run, the last one always)."""
MAX_SAMPLE_CHARS = 400


@dataclass
class RunData:
    """Everything the report reads from one run directory.

    Attributes:
        run_dir: The folder.
        config: The resolved config (``config.yaml``) as a dict.
        config_text: ``config.yaml`` as written.
        metrics: ``metrics.json`` (empty before the first committed stage).
        state: ``state.json`` (None before the first committed stage).
        task: The task spec (``task.yaml``, else ``config.task.name``), or None if neither loads.
        records: Every record of the data parts, accepted and rejected, in part order.
    """

    run_dir: Path
    config: dict[str, Any]
    config_text: str
    metrics: dict[str, Any]
    state: dict[str, Any] | None
    task: TaskSpec | None
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def iterations(self) -> list[dict[str, Any]]:
        """Per-iteration metrics."""
        return list(self.metrics.get("iterations") or [])

    @property
    def finished(self) -> bool:
        """Whether the run finished (the final student exists)."""
        return bool(self.state and self.state.get("finished"))

    @property
    def strategy(self) -> dict[str, Any]:
        """The ``strategy`` section of the config."""
        return dict(self.config.get("strategy") or {})

    def accepted(self) -> list[dict[str, Any]]:
        """Accepted training and probe records."""
        return [r for r in self.records if not r.get("reject_reason")]

    def rejected(self) -> list[dict[str, Any]]:
        """Rejected records (with ``reject_reason``)."""
        return [r for r in self.records if r.get("reject_reason")]

    def feedback_ids(self) -> dict[int, list[str]]:
        """The feedback ids picked in each iteration."""
        return {i: list((m.get("feedback") or {}).get("ids") or []) for i, m in enumerate(self.iterations)}


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory for a report (also one that is still going or was stopped).

    Raises:
        RunReadError: no such folder, no ``config.yaml`` in it, or an unreadable file (named).
    """
    root = Path(run_dir)
    config = run_config(root)
    config_text = (root / store.CONFIG_FILE).read_text(encoding="utf-8")
    metrics_path = root / "metrics.json"
    try:
        metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
        state = store.load_state(root)
    except json.JSONDecodeError as err:
        raise RunReadError(f"{root}: unreadable run file: {err}") from err
    try:
        task: TaskSpec | None = run_task(root, config)
    except RunReadError:
        task = None  # the report still shows what it can without label names
    records = []
    for rel in (state or {}).get("parts", []):
        path = root / rel
        # Only training data and rejects; other parts (e.g. LLKD's unlabelled pool) are not samples.
        if path.is_file() and path.name.startswith(SAMPLE_PARTS):
            records.extend(store.read_parts([path]))
    return RunData(root, config, config_text, metrics, state, task, records)


# ---- what the plots show ------------------------------------------------------------------


def accuracy_series(run: RunData) -> tuple[str, dict[str, list[float | None]], dict[str, float]]:
    """The student's quality per iteration: ``(ylabel, series, final)``.

    The real evaluation set when the run has one (train-stage metrics), the synthetic hold-out
    (the iteration's fresh probes) otherwise.
    """
    real: list[float | None] = []
    holdout: list[float | None] = []
    metric = None
    for m in run.iterations:
        q = quality(m.get("train") or {})
        real.append(q[1] if q else None)
        metric = metric or (q[0] if q else None)
        h = quality(m.get("probe") or {})
        holdout.append(h[1] if h and h[0].startswith("hold-out") else None)
        metric = metric or (h[0].removeprefix("hold-out ") if h else None)
    metric = metric or "accuracy"
    final_q = quality(run.metrics.get("final") or {})
    series: dict[str, list[float | None]] = {}
    final: dict[str, float] = {}
    if any(v is not None for v in real):
        series["real eval set"] = real
        if final_q:
            final["real eval set"] = final_q[1]
        return metric, series, final
    if any(v is not None for v in holdout):
        series["synthetic hold-out (fresh probes)"] = holdout
    if final_q and not final_q[0].startswith("hold-out"):
        final["real eval set"] = final_q[1]
    return metric, series, final


def label_counts(run: RunData, top: int = MAX_TARGET_VALUES) -> dict[str, dict[str, float]]:
    """Accepted records per iteration (``it 1``...) and label.

    Text-to-text targets (answers) have open-ended values: the ``top`` most frequent are kept and
    the rest counted as ``other``.
    """
    task = run.task
    key = "label" if task is None else task.target_key
    values = [(int(r.get("iteration") or 0), str(r.get(key))) for r in run.accepted()]
    if task is not None and not task.is_classification:
        keep = {v for v, _ in Counter(v for _, v in values).most_common(top)}
        values = [(it, v if v in keep else "other") for it, v in values]
    out: dict[int, Counter] = {}
    for it, value in values:
        out.setdefault(it, Counter())[value] += 1
    return {f"it {it + 1}": dict(out[it]) for it in sorted(out)}


def reject_counts(run: RunData) -> dict[str, dict[str, float]]:
    """Rejected records per reason and kind (train, probe)."""
    out: dict[str, Counter] = {}
    for r in run.rejected():
        out.setdefault(str(r["reject_reason"]), Counter())[str(r.get("kind") or "?")] += 1
    return {k: dict(v) for k, v in sorted(out.items(), key=lambda kv: -sum(kv[1].values()))}


def stage_seconds(run: RunData) -> dict[str, dict[str, float]]:
    """Seconds per iteration and stage (generate, train, probe), and the final stage."""
    out: dict[str, dict[str, float]] = {}
    for i, m in enumerate(run.iterations):
        out[f"it {i + 1}"] = {s: float((m.get(s) or {}).get("seconds") or 0.0) for s in ("generate", "train", "probe")}
    final = run.metrics.get("final") or {}
    if final.get("seconds") is not None:
        out["final"] = {"train": float(final["seconds"])}
    return out


def throughput_series(run: RunData) -> dict[str, list[float | None]]:
    """Teacher output tokens per second in the generate and probe stages, per iteration."""
    series: dict[str, list[float | None]] = {}
    for stage in ("generate", "probe"):
        series[f"{stage} tokens/s"] = [(m.get(stage) or {}).get("tokens_per_s") for m in run.iterations]
    return series


def energy_panels(run: RunData, limit: int | None = None) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Per iteration with scored probes: ``(iteration, probe scores, scores of the picked feedback)``.

    With ``limit``, at most that many iterations, spread over the run (first and last included).
    """
    fb = run.feedback_ids()
    accepted = run.accepted()
    out = []
    for it in sorted({int(r.get("iteration") or 0) for r in run.records if r.get("kind") == "probe"}):
        probes = [r for r in accepted if r.get("kind") == "probe" and int(r.get("iteration") or 0) == it]
        scores = np.array([_float(r.get("score")) for r in probes], dtype=float)
        if not np.isfinite(scores).any():
            continue
        picked = set(fb.get(it, []))
        sel = np.array([_float(r.get("score")) for r in probes if r.get("id") in picked], dtype=float)
        out.append((it, scores, sel))
    if limit is not None and len(out) > limit:
        keep = np.unique(np.linspace(0, len(out) - 1, limit).round().astype(int))
        out = [out[i] for i in keep]
    return out


def _float(v: Any) -> float:
    try:
        return float(v) if v is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


# ---- HTML ---------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2rem auto; max-width: 1200px;
       color: #222; padding: 0 1rem; }
h1 { font-size: 1.6rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: .3rem; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .92rem; }
th, td { border: 1px solid #ddd; padding: .3rem .55rem; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img.plot { max-width: 100%; border: 1px solid #eee; margin: .4rem 0; }
.samples { display: grid; grid-template-columns: repeat(3, 1fr); gap: 1rem; }
.samples > div { min-width: 0; }
.sample { border: 1px solid #e3e3e3; border-radius: 6px; padding: .45rem .6rem; margin: .45rem 0;
          font-size: .88rem; overflow-wrap: anywhere; white-space: pre-wrap; }
.tag { display: inline-block; font-size: .75rem; background: #eef; border-radius: 4px; padding: 0 .35rem;
       margin-right: .3rem; }
.reject .tag { background: #fee; } .feedback .tag { background: #efe; }
pre { background: #f7f7f7; padding: .8rem; overflow-x: auto; font-size: .85rem; }
.note { color: #555; font-size: .9rem; }
"""


def esc(value: Any) -> str:
    """HTML-escape any value as text (quotes included)."""
    return html.escape("" if value is None else str(value), quote=True)


def img(png: bytes, alt: str) -> str:
    """An ``<img>`` with the PNG inlined as a base64 data URI."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="plot" alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) else "–"
    return esc(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{_fmt(c)}</td>' if isinstance(c, int | float) and not isinstance(c, bool)
                         else f"<td>{_fmt(c)}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def _sample_text(run: RunData, rec: dict[str, Any]) -> str:
    task = run.task
    fields = task.field_names if task else ["text"]
    parts = [f"{f}: {rec.get(f)}" for f in fields if rec.get(f)] if len(fields) > 1 else [str(rec.get(fields[0]) or "")]
    text = "\n".join(p for p in parts if p) or str(rec.get("raw_text") or "")
    return text if len(text) <= MAX_SAMPLE_CHARS else text[:MAX_SAMPLE_CHARS] + " …"


def pick_samples(run: RunData, k: int = SAMPLES_PER_COLUMN) -> dict[str, list[dict[str, Any]]]:
    """Up to ``k`` accepted, feedback and rejected records (spread over labels and reasons)."""
    task = run.task
    key = task.target_key if task else "label"
    fb_ids = {i for ids in run.feedback_ids().values() for i in ids}
    accepted = [r for r in run.accepted() if r.get("kind") == "train"] or run.accepted()
    feedback = [r for r in run.accepted() if r.get("id") in fb_ids]
    return {
        "accepted": _spread(accepted, lambda r: str(r.get(key)), k),
        "feedback": _spread(feedback, lambda r: str(r.get(key)), k),
        "rejected": _spread(run.rejected(), lambda r: str(r.get("reject_reason")), k),
    }


def _spread(records: list[dict[str, Any]], group, k: int) -> list[dict[str, Any]]:
    # Round-robin over groups, newest first, so every label (or reason) shows up before any repeats.
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in reversed(records):
        groups.setdefault(group(r), []).append(r)
    out: list[dict[str, Any]] = []
    while len(out) < k and any(groups.values()):
        for g in list(groups):
            if groups[g] and len(out) < k:
                out.append(groups[g].pop(0))
    return out


def _samples_html(run: RunData) -> str:
    task = run.task
    key = task.target_key if task else "label"
    picked = pick_samples(run)
    titles = {"accepted": "Accepted (training data)", "feedback": "Feedback (fed back to the teacher)",
              "rejected": "Rejected (with reason)"}
    cols = []
    for kind, recs in picked.items():
        cards = []
        for r in recs:
            tags = [f"it {int(r.get('iteration') or 0) + 1}"]
            if kind == "rejected":
                tags.append(str(r.get("reject_reason")))
                text = str(r.get("raw_text") or "")
                text = text if len(text) <= MAX_SAMPLE_CHARS else text[:MAX_SAMPLE_CHARS] + " …"
                detail = f"\n({r['reject_detail']})" if r.get("reject_detail") else ""
                text += detail
            else:
                tags.append(f"{key}: {r.get(key)}")
                if kind == "feedback" and math.isfinite(_float(r.get("score"))):
                    tags.append(f"score {float(r['score']):.3f}")
                text = _sample_text(run, r)
            tag_html = "".join(f'<span class="tag">{esc(t)}</span>' for t in tags)
            cards.append(f'<div class="sample {kind}">{tag_html}\n{esc(text)}</div>')
        body = "".join(cards) or '<p class="note">none</p>'
        cols.append(f'<div><h3>{esc(titles[kind])}</h3>{body}</div>')
    return f'<div class="samples">{"".join(cols)}</div>'


def _header_rows(run: RunData) -> list[list[Any]]:
    m, c = run.metrics, run.config
    totals = m.get("totals") or {}
    rejected = sum(v for k, v in totals.items() if k.startswith("rejected_"))
    if run.finished:
        status = "finished"
    elif run.state:
        status = f"in progress or stopped: iteration {run.state.get('iteration', 0) + 1}, " \
                 f"last committed stage {run.state.get('stage')}"
    else:
        status = "not started"
    return [
        ["run directory", str(run.run_dir)],
        ["status", status],
        ["task", _task_label(run)],
        ["strategy", (c.get("strategy") or {}).get("name")],
        ["teacher", (c.get("teacher") or {}).get("model")],
        ["student", (c.get("student") or {}).get("model")],
        ["seed", c.get("seed")],
        ["accepted samples", int(totals.get("accepted", 0))],
        ["rejected samples", int(rejected)],
        ["teacher output tokens", int(m.get("teacher_tokens") or 0)],
    ]


def _task_label(run: RunData) -> str:
    ref = str((run.config.get("task") or {}).get("name"))
    return ref if run.task is None or run.task.name == ref else f"{run.task.name} ({ref})"


def _final_rows(run: RunData) -> list[list[Any]]:
    final = run.metrics.get("final") or {}
    keys = ("accuracy", "macro_f1", "exact_match", "numeric_match", "synthetic_accuracy", "n", "records",
            "val_records", "dropped_by_noise_filter", "loss", "recipe", "val_accuracy", "val_loss", "chance_loss",
            "eval_source", "eval_note", "seconds")
    rows = [[k, final[k]] for k in keys if k in final]
    if final.get("per_label_accuracy"):
        # Which label the student misses: the first thing to read when it loses to a reference row.
        rows.append(["accuracy per label", " · ".join(f"{label} {acc:.3f}" for label, acc
                                                      in final["per_label_accuracy"].items())])
    diversity = final.get("diversity") or {}
    if diversity.get("nearest_overlap") is not None:
        # Whether the teacher repeated itself: a text's nearest other near 1 is a paraphrase of it.
        rows.append(["data diversity", f"distinct word pairs {diversity['distinct_2']:.3f} · nearest-other overlap "
                                       f"{diversity['nearest_overlap']:.3f} · near copies {diversity['near_copies']:.3f} "
                                       f"({diversity['texts']} texts)"])
    for trial in final.get("recipes") or []:
        rows.append([f"candidate {trial.get('recipe')}",
                     f"val_accuracy {trial.get('val_accuracy', '')} · epochs {trial.get('epochs', '')} · "
                     f"best epoch {trial.get('best_epoch', '')} · loss {trial.get('loss', '')}"])
    if "synthetic_accuracy" in final:
        rows.append(["note", "synthetic_accuracy is on a held-out share of the generated data: not comparable "
                             "with accuracy on real data"])
    return rows


def _references_html(run: RunData) -> list[str]:
    """The final student beside the teacher as a few-shot classifier and the majority class."""
    from gold_ray.run.baselines import reference_rows, reference_verdict, student_metric

    final = run.metrics.get("final") or {}
    rows = reference_rows(final)
    if not rows:
        return []
    base = final.get("baselines") or {}
    metric = (student_metric(final) or ("accuracy", 0.0))[0]
    synthetic = base.get("on") != "eval set"
    where = ("a synthetic hold-out: generated data nothing trained on, labelled by the label the teacher "
             "was asked for (no real evaluation set; not comparable with accuracy on real data)") if synthetic \
        else "the real evaluation set"
    return ["<h2>Student beside its teacher</h2>",
            _table(["", metric, "on"], [[name, value if value is not None else "–", note] for name, value, note in rows]),
            f'<p class="note">On the {esc(base.get("n"))} examples of {esc(where)} (the teacher row on the seeded '
            "subset its note counts, where <code>baselines.teacher_fewshot_limit</code> bounds it). The teacher row "
            "scores each label's word with the teacher, prompted with the task's seed demos; a student worth "
            "distilling beats it at a fraction of the cost, and a student below the majority class has learned "
            "nothing usable.</p>",
            *([f"<p><strong>{esc(verdict)}</strong></p>"] if (verdict := reference_verdict(final)) else [])]


def _learning_rows(run: RunData) -> list[list[Any]]:
    """Per iteration: training loss against chance, synthetic validation accuracy, probe energy spread."""
    rows = []
    for i, m in enumerate(run.iterations):
        train, probe = m.get("train") or {}, m.get("probe") or {}
        if not train:
            continue
        rows.append([i + 1, train.get("loss", ""), train.get("chance_loss", ""), train.get("val_accuracy", ""),
                     train.get("val_majority", ""), train.get("epochs", ""), train.get("steps", ""),
                     probe.get("score_iqr", ""), "WARNING: near chance" if train.get("near_chance") else ""])
    return rows


def _iteration_rows(run: RunData) -> list[list[Any]]:
    rows = []
    for i, m in enumerate(run.iterations):
        gen, probe, train = m.get("generate") or {}, m.get("probe") or {}, m.get("train") or {}
        q = quality(train) or quality(probe)
        rows.append([i + 1, f"{gen.get('accepted', '')}/{gen.get('requested', '')}",
                     f"{probe.get('accepted', '')}/{probe.get('requested', '')}" if probe else "",
                     int(gen.get("rejected", 0)) + int(probe.get("rejected", 0)),
                     train.get("loss", ""), f"{q[1]:.4f} ({q[0]})" if q else "",
                     (m.get("feedback") or {}).get("size", ""), gen.get("tokens_per_s") or "",
                     round(rate, 2) if (rate := scoring_rate(probe)) else ""])
    return rows


def render_report(run: RunData) -> str:
    """The report page of one run (HTML text)."""
    s = run.strategy
    task_name = run.task.name if run.task else (run.config.get("task") or {}).get("name")
    parts = [f"<h1>gold-ray report: {esc(task_name)} · {esc(s.get('name'))}</h1>",
             _table(["", ""], _header_rows(run))]
    final_rows = _final_rows(run)
    parts.append("<h2>Final student</h2>")
    parts.append(_table(["metric", "value"], final_rows) if final_rows
                 else '<p class="note">The run has not reached its final stage.</p>')
    if run.finished:
        parts.append(f'<p class="note">Load it from <code>{esc(run.run_dir / "student")}</code> '
                     "(see the README's \"Use the student\").</p>")
    parts += _references_html(run)

    learning = _learning_rows(run)
    if learning:
        parts.append("<h2>Did the student learn?</h2>")
        parts.append(_table(["iteration", "train loss", "chance (ln K)", "synthetic val acc", "val majority",
                             "epochs", "steps", "probe energy IQR", ""], learning))
        parts.append('<p class="note">A student whose loss stays near ln K, or whose accuracy on the synthetic '
                     "validation split stays near its majority share, scores every probe alike: the feedback "
                     "band it picks is then a random pick.</p>")

    metric, series, final = accuracy_series(run)
    fig, ax = grid_figure()
    plot_iteration_series(ax[0, 0], series, ylabel=f"student {metric}", title=f"student {metric} per iteration",
                          final=final)
    parts += ["<h2>Accuracy per iteration</h2>", img(figure_png(fig), f"student {metric} per iteration")]
    if "real eval set" in series:
        parts.append('<p class="note">The student on the real evaluation set after each iteration\'s training '
                     "stage; the star is the final student.</p>")
    elif series:
        parts.append('<p class="note">No real evaluation set: per-iteration values are on a synthetic hold-out, the '
                     "iteration's fresh probes (written after its training stage, labelled by the requested "
                     "label).</p>")
    else:
        parts.append('<p class="note">No real evaluation set and no probes: only the training loss is known '
                     "per iteration (table below).</p>")
    parts.append(_table(["iteration", "train samples accepted/requested", "probes accepted/requested", "rejected",
                         "train loss", "quality", "feedback pool", "teacher tokens/s",
                         "probes scored/s"], _iteration_rows(run)))

    panels = energy_panels(run, limit=MAX_ENERGY_PANELS)
    parts.append("<h2>Energy distributions per iteration</h2>")
    if panels:
        ncols = min(3, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig, axes = grid_figure(ncols, nrows, width=4.6, height=3.3)
        band = (float(s.get("band_lo", BAND_DEFAULTS[0])), float(s.get("band_hi", BAND_DEFAULTS[1])))
        score_name = str(s.get("score", "energy"))
        for n, (it, scores, sel) in enumerate(panels):
            plot_energy_band(axes[n // ncols, n % ncols], scores, band=band, selected=sel, score_name=score_name,
                             title=f"iteration {it + 1}: probes (n={int(np.isfinite(scores).sum())})")
        for n in range(len(panels), nrows * ncols):
            axes[n // ncols, n % ncols].set_visible(False)
        parts.append(img(figure_png(fig), "energy distributions per iteration with the feedback band"))
    else:
        parts.append('<p class="note">No scored probes: this strategy does not score probes with the student.</p>')

    fig, axes = grid_figure(2, 1)
    counts = label_counts(run)
    label_title = "label balance of accepted data" if run.task is None or run.task.is_classification \
        else f"{run.task.target_key} values of accepted data"
    plot_stacked_bars(axes[0, 0], {k: v for k, v in counts.items()}, xlabel="iteration", ylabel="accepted samples",
                      title=label_title)
    plot_stacked_bars(axes[0, 1], reject_counts(run), xlabel="reason", ylabel="rejected samples",
                      title="reject reasons", horizontal=True)
    parts += ["<h2>Label balance and reject reasons</h2>",
              img(figure_png(fig), "label balance of accepted data and reject reasons")]

    parts += ["<h2>Samples</h2>", '<p class="note">Generated text is shown as written by the teacher '
              "(escaped, truncated).</p>", _samples_html(run)]

    fig, axes = grid_figure(2, 1)
    plot_stacked_bars(axes[0, 0], stage_seconds(run), xlabel="iteration", ylabel="seconds",
                      title="time per stage")
    plot_iteration_series(axes[0, 1], throughput_series(run), ylabel="output tokens / s", title="teacher throughput")
    parts += ["<h2>Throughput per stage</h2>", img(figure_png(fig), "time per stage and teacher throughput")]

    parts += ["<h2>Config</h2>", f"<pre>{esc(run.config_text)}</pre>"]
    return _page(f"gold-ray report: {task_name} {s.get('name')}", "\n".join(parts))


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write (or rebuild) a run's report, by default ``RUN_DIR/report.html``; returns its path."""
    run = load_run(run_dir)
    path = Path(out) if out else run.run_dir / REPORT_FILE
    store.atomic_write_bytes(path, render_report(run).encode("utf-8"))
    return path


# ---- two runs -----------------------------------------------------------------------------


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def render_comparison(a: RunData, b: RunData, names: tuple[str, str] = ("A", "B")) -> str:
    """A page comparing two runs (HTML text)."""
    na, nb = names
    parts = [f"<h1>gold-ray: {esc(na)} vs {esc(nb)}</h1>"]
    ha, hb = _header_rows(a), _header_rows(b)
    parts.append(_table(["", na, nb], [[x[0], x[1], y[1]] for x, y in zip(ha, hb, strict=True)]))

    fa, fb = dict(_final_rows(a)), dict(_final_rows(b))
    keys = [k for k in dict.fromkeys([*fa, *fb])]
    parts += ["<h2>Final student</h2>",
              _table(["metric", na, nb], [[k, fa.get(k, "–"), fb.get(k, "–")] for k in keys]) if keys
              else '<p class="note">Neither run has reached its final stage.</p>']

    fig, axes = grid_figure(2, 1)
    ma, sa, fa_ = accuracy_series(a)
    mb, sb, fb_ = accuracy_series(b)
    series = {f"{na}: {k}": v for k, v in sa.items()} | {f"{nb}: {k}": v for k, v in sb.items()}
    final = {f"{na}: {k}": v for k, v in fa_.items()} | {f"{nb}: {k}": v for k, v in fb_.items()}
    plot_iteration_series(axes[0, 0], series, ylabel=f"student {ma}", title=f"student {ma} per iteration",
                          final=final)
    ax = axes[0, 1]
    drew = False
    for name, run in ((na, a), (nb, b)):
        panels = energy_panels(run)
        if panels:
            it, scores, _ = panels[-1]
            s = scores[np.isfinite(scores)]
            ax.hist(s, bins=min(30, max(5, s.size // 2)), histtype="step", linewidth=1.6,
                    label=f"{name}: iteration {it + 1} (n={s.size})")
            drew = True
    if drew:
        ax.set_xlabel("probe score (higher = more out-of-distribution)")
        ax.set_ylabel("probes")
        ax.legend(fontsize="small")
        ax.set_title("last iteration's probe scores")
    else:
        mark_empty(ax, "no scored probes in either run")
    parts += ["<h2>Accuracy and probe scores</h2>", img(figure_png(fig), "accuracy per iteration of both runs")]

    fig, axes = grid_figure(3, 1, width=4.6)
    labels: dict[str, dict[str, float]] = {}
    for name, run in ((na, a), (nb, b)):
        for per_it in label_counts(run).values():
            for label, n in per_it.items():
                labels.setdefault(label, {})
                labels[label][name] = labels[label].get(name, 0) + n
    plot_grouped_bars(axes[0, 0], labels, ylabel="accepted samples", title="label balance of accepted data")
    reasons: dict[str, dict[str, float]] = {}
    for name, run in ((na, a), (nb, b)):
        for reason, kinds in reject_counts(run).items():
            reasons.setdefault(reason, {})[name] = sum(kinds.values())
    plot_grouped_bars(axes[0, 1], reasons, ylabel="rejected samples", title="reject reasons")
    stages: dict[str, dict[str, float]] = {}
    for name, run in ((na, a), (nb, b)):
        for per_it in stage_seconds(run).values():
            for stage, sec in per_it.items():
                stages.setdefault(stage, {})
                stages[stage][name] = stages[stage].get(name, 0.0) + sec
    plot_grouped_bars(axes[0, 2], stages, ylabel="seconds (whole run)", title="time per stage")
    parts += ["<h2>Data and throughput</h2>", img(figure_png(fig), "label balance, reject reasons, time per stage")]

    ca, cb = _flatten(a.config), _flatten(b.config)
    diff = [[k, json.dumps(ca.get(k)), json.dumps(cb.get(k))] for k in sorted(set(ca) | set(cb))
            if ca.get(k) != cb.get(k)]
    parts += ["<h2>Config differences</h2>",
              _table(["key", na, nb], diff) if diff else '<p class="note">The configs are the same.</p>']
    return _page(f"gold-ray: {na} vs {nb}", "\n".join(parts))


def write_comparison(run_a: str | Path, run_b: str | Path, out: str | Path) -> Path:
    """Write a page comparing two run directories to ``out``; returns its path."""
    a, b = load_run(run_a), load_run(run_b)
    names = (str(run_a), str(run_b))
    path = Path(out)
    store.atomic_write_bytes(path, render_comparison(a, b, names).encode("utf-8"))
    return path
