"""Progress of a running distillation: a live terminal view, one line per stage, or JSON lines.

The loop calls ``on_event(stage, info)`` after every committed stage (``generate``, ``train``,
``probe``, ``feedback`` per iteration, then ``final``), and also ``on_event("plan", ...)`` once
(the samples each stage requests) and ``on_event("progress", ...)`` within a stage (samples done
of requested with rejects so far, records scored, training steps done of planned; at most one per
stage per second, :class:`gold_ray.run.runtime.StageProgress`); the Ray driver forwards the same
events and adds ``log`` (gold-ray's own warnings). :class:`ProgressTracker` turns them into
per-iteration rows, the running stage's counts and ETAs from measured rates, and a reporter shows them:

- ``live``: a `rich <https://rich.readthedocs.io>`_ view that redraws in place (terminals only);
- ``plain``: one line per stage (CI and job logs), and a progress line at most every
  :data:`PLAIN_PROGRESS_EVERY_S` seconds within a long stage;
- ``json``: one JSON object per event per line (``{"event": stage, "time": ..., ...}``);
- ``quiet``: nothing per stage.

``auto`` picks ``live`` when the stream is a terminal and ``plain`` otherwise.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

ITERATION_STAGES = ("generate", "train", "probe", "feedback")
"""The stages of one iteration, in order (the loop's ``STAGES``)."""

MODES = ("auto", "live", "plain", "json", "quiet")

STAGE_EVENTS = (*ITERATION_STAGES, "final")
"""Events of a committed stage; the others are ``plan``, ``progress`` and ``log``."""

PLAIN_PROGRESS_EVERY_S = 30.0
"""Least seconds between two progress lines of the plain view (off a terminal, lines stay)."""

QUALITY_KEYS = ("accuracy", "exact_match", "numeric_match")
"""Per-task quality metrics, in order of preference."""


def format_seconds(seconds: float | None) -> str:
    """``1:02:03`` / ``2:03`` for a duration; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(0, int(round(seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def quality(info: dict[str, Any]) -> tuple[str, float] | None:
    """The stage's quality metric: ``(name, value)`` on the real eval set, else the synthetic hold-out."""
    for key in QUALITY_KEYS:
        if _number(info.get(key)) is not None:
            return key, float(info[key])
    for key in QUALITY_KEYS:
        if _number(info.get(f"holdout_{key}")) is not None:
            return f"hold-out {key}", float(info[f"holdout_{key}"])
    return None


def scoring_rate(info: dict[str, Any]) -> float | None:
    """Probes scored per second in a probe stage (None when nothing was scored)."""
    scored = info.get("scored")
    if scored is None and isinstance(info.get("scores"), dict) and info["scores"]:
        scored = info.get("accepted")  # in-process scoring scores every accepted probe
    seconds = _number(info.get("score_seconds")) or _number(info.get("seconds"))
    if not scored or not seconds:
        return None
    return scored / seconds


@dataclass
class ProgressTracker:
    """Per-iteration rows, stage durations and ETAs from the loop's events.

    Args:
        iterations: Iterations of the run (events also carry it).
        final_ratio: The final stage's training epochs over an iteration's (``final_epochs /
            epochs_per_iteration``): the final stage's time is projected from the train stages.
        clock: Monotonic seconds (tests pass a fake clock).
    """

    iterations: int = 0
    final_ratio: float = 1.0
    clock: Callable[[], float] = time.monotonic
    rows: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    durations: dict[str, dict[int, float]] = field(default_factory=dict)
    finished_stages: int = 0
    done: bool = False
    current: tuple[int, str] = (0, "generate")

    def __post_init__(self) -> None:
        self.started = self.clock()
        self.stage_started = self.started
        self._seen_any = False
        self.live: dict[str, Any] | None = None
        """The running stage's last ``progress`` info (None until one comes)."""
        self.plan: dict[str, Any] | None = None
        """The ``plan`` event: ``samples`` per iteration as ``[generate, probe]``."""
        self.teacher_seconds_per_sample: float | None = None
        """Measured while the teacher writes (``samples`` progress), for stages not yet run."""

    def set_plan(self, info: dict[str, Any]) -> None:
        """Record the run's plan (``plan`` event)."""
        self.plan = dict(info)
        self.iterations = int(info.get("iterations") or self.iterations)

    def progress(self, info: dict[str, Any]) -> None:
        """Record the running stage's counts (``progress`` event)."""
        it, stage = int(info.get("iteration", 0)), str(info.get("stage", ""))
        self.iterations = int(info.get("iterations") or self.iterations)
        if stage and (it, stage) != self.current and stage in (*ITERATION_STAGES, "final"):
            # A resumed run starts where it stopped: follow the events, not the plan.
            self.current = (it, stage)
        self.live = dict(info)
        rate = _number(info.get("rate_per_s"))
        if info.get("unit") == "samples" and rate:
            self.teacher_seconds_per_sample = 1.0 / rate

    def eta_stage(self) -> float | None:
        """Seconds until the running count ends (its measured rate); None while unknown."""
        return _number(self.live.get("remaining_s")) if self.live else None

    @property
    def total_stages(self) -> int:
        """Stages of the whole run (four per iteration and the final stage)."""
        return len(ITERATION_STAGES) * self.iterations + 1

    def update(self, stage: str, info: dict[str, Any]) -> None:
        """Record a finished stage."""
        now = self.clock()
        it = int(info.get("iteration", 0))
        self.iterations = int(info.get("iterations") or self.iterations)
        # The first event's wall time includes start-up (models, Ray, Serve); its own timing is closer.
        took = now - self.stage_started
        if not self._seen_any and _number(info.get("seconds")) is not None:
            took = float(info["seconds"])
        self._seen_any = True
        self.durations.setdefault(stage, {})[it] = took
        self.rows.setdefault(it, {})[stage] = dict(info)
        self.stage_started = now
        self.live = None
        if stage == "final":
            self.done = True
            self.finished_stages = self.total_stages
            self.current = (it, "final")
            return
        idx = ITERATION_STAGES.index(stage) if stage in ITERATION_STAGES else len(ITERATION_STAGES) - 1
        self.finished_stages = max(self.finished_stages, it * len(ITERATION_STAGES) + idx + 1)
        if idx + 1 < len(ITERATION_STAGES):
            self.current = (it, ITERATION_STAGES[idx + 1])
        elif it + 1 < self.iterations:
            self.current = (it + 1, ITERATION_STAGES[0])
        else:
            self.current = (self.iterations, "final")

    def elapsed(self) -> float:
        """Seconds since the tracker started."""
        return self.clock() - self.started

    def stage_elapsed(self) -> float:
        """Seconds the running stage has taken so far."""
        return self.clock() - self.stage_started

    def _train_per_iteration_unit(self) -> float | None:
        # Each train stage trains on everything kept so far, so its time grows with the iteration.
        seen = dict(self.durations.get("train", {}))
        it, stage = self.current
        left = self.eta_stage()
        if not seen and stage == "train" and left is not None:
            seen[it] = self.stage_elapsed() + left  # the first training, projected from its step rate
        if not seen:
            return None
        return sum(d / (i + 1) for i, d in seen.items()) / len(seen)

    def _planned_samples(self, stage: str, iteration: int) -> int | None:
        samples = (self.plan or {}).get("samples") or []
        if iteration >= len(samples):
            return None
        return int(samples[iteration][0 if stage == "generate" else 1])

    def estimate(self, stage: str, iteration: int) -> float | None:
        """Projected seconds of ``stage`` at ``iteration`` from the stages measured so far."""
        if stage in ("train", "final"):
            unit = self._train_per_iteration_unit()
            if unit is None:
                return None
            if stage == "final":
                return unit * max(1, self.iterations) * self.final_ratio
            return unit * (iteration + 1)
        seen = self.durations.get(stage, {})
        if seen:
            return sum(seen.values()) / len(seen)
        if stage == "feedback":
            return 0.0  # picking the feedback is quick next to the teacher and training
        n = self._planned_samples(stage, iteration)
        if n is not None and self.teacher_seconds_per_sample is not None:
            return n * self.teacher_seconds_per_sample  # a teacher stage not run yet, at the measured rate
        return None

    def _remaining(self, plan: list[tuple[int, str]]) -> float | None:
        total = 0.0
        for n, (it, stage) in enumerate(plan):
            left = self.eta_stage() if n == 0 and stage != "final" else None
            if left is not None:
                total += left  # the running stage, from its own measured rate
                continue
            est = self.estimate(stage, it)
            if est is None:
                return None
            total += max(0.0, est - self.stage_elapsed()) if n == 0 else est
        return total

    def _plan(self, whole_run: bool) -> list[tuple[int, str]]:
        if self.done:
            return []
        it, stage = self.current
        if stage == "final":
            return [(it, "final")]
        plan = [(it, s) for s in ITERATION_STAGES[ITERATION_STAGES.index(stage):]]
        if whole_run:
            plan += [(j, s) for j in range(it + 1, self.iterations) for s in ITERATION_STAGES]
            plan.append((self.iterations, "final"))
        return plan

    def eta_iteration(self) -> float | None:
        """Seconds until the running iteration (or the final stage) ends; None while unknown."""
        return 0.0 if self.done else self._remaining(self._plan(whole_run=False))

    def eta_run(self) -> float | None:
        """Seconds until the whole run ends; None while unknown."""
        return 0.0 if self.done else self._remaining(self._plan(whole_run=True))


def shows_eta_iteration(event: str) -> bool:
    """Whether the line or record of ``event`` carries the running iteration's ETA: not an
    iteration's last stage, after which the tracker already counts the next iteration (its ETA
    there read as the finished one's)."""
    return event != ITERATION_STAGES[-1]


def format_line(stage: str, info: dict[str, Any], tracker: ProgressTracker | None = None) -> str:
    """One log line for a finished stage (the ``plain`` view)."""
    it = info.get("iteration", 0)
    total = info.get("iterations", 0)
    head = f"[{time.strftime('%H:%M:%S')}] iteration {it + 1}/{total} {stage:<8}"
    if stage == "final":
        head = f"[{time.strftime('%H:%M:%S')}] final stage     "
    if info.get("run"):  # several runs in one stream (gold-ray compare)
        head = f"{info['run']} {head}"
    keys = ("requested", "accepted", "rejected", "tokens_per_s", "samples_per_s", "records", "loss", "train_loss",
            "chance_loss", "val_accuracy", "accuracy", "macro_f1", "exact_match", "numeric_match", "holdout_accuracy",
            "holdout_exact_match", "synthetic_accuracy", "score_iqr", "recipe", "size", "seconds")
    parts = []
    # ln K is the chance level of a CE loss only: beside an SCE loss it reads as a failure.
    not_ce = isinstance(info.get("loss"), str) and info["loss"] != "ce"
    for k in keys:
        v = info.get(k)
        if v is None or (isinstance(v, float) and not math.isfinite(v)) or (k == "chance_loss" and not_ce):
            continue
        parts.append(f"{k}={round(v, 4) if isinstance(v, float) else v}")
    rate = scoring_rate(info) if stage == "probe" else None
    if rate is not None:
        parts.append(f"scored_per_s={rate:.1f}")
    if info.get("rejected_by_reason"):
        parts.append(f"reasons={info['rejected_by_reason']}")
    if info.get("near_chance"):
        parts.append("WARNING: the student is near chance, so its feedback band is a random pick")
    if info.get("band_held"):
        parts.append("the student is near chance: no band added, the feedback pool kept as it was")
    if tracker is not None and not tracker.done:
        if shows_eta_iteration(stage):
            parts.append(f"eta_iteration={format_seconds(tracker.eta_iteration())}")
        parts.append(f"eta_run={format_seconds(tracker.eta_run())}")
    return f"{head} {' '.join(parts)}"


def format_counts(info: dict[str, Any]) -> str:
    """The running stage's counts in words: ``21/48 samples, 3 rejected`` or ``40/120 steps``."""
    unit = info.get("unit") or ""
    text = f"{info.get('done', 0)}/{info.get('total', '?')} {unit}"
    extras = [f"{info[k]} {k}" for k in ("rejected", "scored") if unit != k and info.get(k)]
    if info.get("phase"):
        extras.append(str(info["phase"]))
    return text + (f", {', '.join(extras)}" if extras else "")


def format_progress_line(info: dict[str, Any], tracker: ProgressTracker | None = None) -> str:
    """One log line for the running stage's counts (the ``plain`` view, at most every 30 s)."""
    it, total = info.get("iteration", 0), info.get("iterations", 0)
    stage = info.get("stage", "")
    where = "final stage     " if stage == "final" else f"iteration {it + 1}/{total} {stage:<8}"
    line = f"[{time.strftime('%H:%M:%S')}] {where} ... {format_counts(info)}"
    if info.get("run"):
        line = f"{info['run']} {line}"
    if tracker is not None:
        line += (f" eta_stage={format_seconds(tracker.eta_stage())} eta_iteration={format_seconds(tracker.eta_iteration())}"
                 f" eta_run={format_seconds(tracker.eta_run())}")
    return line


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


def event_record(event: str, info: dict[str, Any], tracker: ProgressTracker | None = None) -> dict[str, Any]:
    """The JSON object of one event (the ``json`` view); NaN and infinities become null."""
    rec: dict[str, Any] = {"event": event, "time": datetime.now(UTC).isoformat(timespec="milliseconds")}
    rec.update(_json_safe(info))
    if tracker is not None:
        rec["elapsed_s"] = round(tracker.elapsed(), 3)
        etas = [("eta_run_s", tracker.eta_run())]
        if shows_eta_iteration(event):
            etas.insert(0, ("eta_iteration_s", tracker.eta_iteration()))
        if event == "progress":
            etas.insert(0, ("eta_stage_s", tracker.eta_stage()))
        for key, value in etas:
            rec[key] = round(value, 1) if value is not None else None
    return rec


class Reporter:
    """Shows a run's progress; call it as the loop's ``on_event``.

    Args:
        stream: Where to write (stdout by default).
        tracker: The progress state (a fresh one by default).
        title: What runs, for the header.
    """

    mode = "quiet"

    def __init__(self, stream: TextIO | None = None, tracker: ProgressTracker | None = None, title: str = "",
                 eta: bool = True):
        self.stream = stream or sys.stdout
        self.tracker = tracker or ProgressTracker()
        self.title = title
        self.eta = eta

    @property
    def _eta_tracker(self) -> ProgressTracker | None:
        return self.tracker if self.eta else None

    def __call__(self, stage: str, info: dict[str, Any]) -> None:
        """Record an event of the loop and show it: a finished stage, ``plan``, ``progress`` or ``log``."""
        if stage == "plan":
            self.tracker.set_plan(info)
            self.show_other(stage, info)
        elif stage == "progress":
            self.tracker.progress(info)
            self.show_progress(info)
        elif stage == "log":
            prefix = f"{info['run']} " if info.get("run") else ""
            self.message("log", f"{prefix}gold-ray: {str(info.get('level', 'warning')).lower()}: {info.get('message', '')}",
                         **{k: v for k, v in info.items() if k != "message"})
        elif stage in STAGE_EVENTS:
            self.tracker.update(stage, info)
            self.show(stage, info)
        else:
            self.show_other(stage, info)

    def show(self, stage: str, info: dict[str, Any]) -> None:
        """Show a finished stage (nothing in the quiet view)."""

    def show_progress(self, info: dict[str, Any]) -> None:
        """Show the running stage's counts (nothing in the quiet view)."""

    def show_other(self, event: str, info: dict[str, Any]) -> None:
        """Show an event that is neither a stage nor progress (only the JSON view does)."""

    def message(self, event: str, text: str, **fields: Any) -> None:
        """A run-level message (start, done); the quiet view keeps only ``done``."""
        if event == "done":
            self._print(text)

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class PlainReporter(Reporter):
    """One line per stage (see :func:`format_line`)."""

    mode = "plain"

    def show(self, stage: str, info: dict[str, Any]) -> None:
        """Print the stage's line."""
        self._print(format_line(stage, info, self._eta_tracker))
        self._last_progress: float | None = None

    def show_progress(self, info: dict[str, Any]) -> None:
        """Print a progress line when the last one (or the stage's start) is old enough."""
        now = self.tracker.clock()
        last = getattr(self, "_last_progress", None)
        since = now - (last if last is not None else self.tracker.stage_started)
        if since >= PLAIN_PROGRESS_EVERY_S:
            self._last_progress = now
            self._print(format_progress_line(info, self._eta_tracker))

    def message(self, event: str, text: str, **fields: Any) -> None:
        """Print the message as is."""
        self._print(text)


class JsonReporter(Reporter):
    """One JSON object per event per line, and nothing else on the stream.

    While it is open, anything else written to ``sys.stdout`` (library prints, Ray's forwarded
    worker output) goes to stderr, so the stream holds JSON lines only.
    """

    mode = "json"

    def __enter__(self) -> JsonReporter:
        self._redirect = contextlib.redirect_stdout(sys.stderr)
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._redirect.__exit__(*exc)

    def show(self, stage: str, info: dict[str, Any]) -> None:
        """Print the stage's JSON object."""
        self._print(json.dumps(event_record(stage, info, self._eta_tracker)))

    def show_progress(self, info: dict[str, Any]) -> None:
        """Print the ``progress`` event (its rate is bounded where it is made), with the ETAs."""
        self._print(json.dumps(event_record("progress", info, self._eta_tracker)))

    def show_other(self, event: str, info: dict[str, Any]) -> None:
        """Print the event as it is (``plan``)."""
        self._print(json.dumps(event_record(event, info)))

    def message(self, event: str, text: str, **fields: Any) -> None:
        """Print the message as an event object with ``message`` and the fields."""
        self._print(json.dumps(event_record(event, {"message": text, **fields})))


class LiveReporter(Reporter):
    """A rich view that redraws in place: a row per iteration, the running stage, ETAs, a bar."""

    mode = "live"

    def __init__(self, stream: TextIO | None = None, tracker: ProgressTracker | None = None, title: str = "",
                 eta: bool = True):
        super().__init__(stream, tracker, title, eta)
        from rich.console import Console

        self.console = Console(file=self.stream)
        self._live: Any = None
        self._after: list[str] = []

    def __enter__(self) -> LiveReporter:
        from rich.live import Live

        self._live = Live(console=self.console, get_renderable=self.render, refresh_per_second=4,
                          redirect_stdout=True, redirect_stderr=True)
        self._live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        for text in self._after:
            self.console.print(text, markup=False, highlight=False)
        self._after.clear()

    def show(self, stage: str, info: dict[str, Any]) -> None:
        """Redraw now (the view also redraws four times a second by itself)."""
        if self._live is not None:
            self._live.refresh()

    def show_progress(self, info: dict[str, Any]) -> None:
        """Nothing to do: the next redraw shows the counts."""

    def message(self, event: str, text: str, **fields: Any) -> None:
        """Print the message above the live view (``done`` below it, once the view has stopped)."""
        if event == "done" and self._live is not None:
            self._after.append(text)
            return
        self.console.print(text, markup=False, highlight=False)

    def render(self) -> Any:
        """The whole view as a rich renderable, built from the tracker's state."""
        from rich import box
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.spinner import Spinner
        from rich.table import Table
        from rich.text import Text

        t = self.tracker
        # Short headers: the table must fit an 80-column terminal.
        table = Table(title=self.title or None, title_justify="left", expand=False, padding=(0, 1),
                      box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
        for name, justify in (("iter", "right"), ("train", "right"), ("probes", "right"), ("rejected", "right"),
                              ("tok/s", "right"), ("scored/s", "right"), ("loss", "right"), ("acc", "right"),
                              ("feedback", "right"), ("time", "right")):
            table.add_column(name, justify=justify)
        for it in sorted(t.rows):
            table.add_row(*self._row_cells(it, t.rows[it]))
        lines: list[Any] = [table]
        notes = ["train, probes: accepted/requested", "tok/s: teacher output tokens per second"]
        reasons = self._reasons()
        if reasons:
            notes.append("rejected by reason: " + ", ".join(f"{k} {v}" for k, v in reasons))
        held = [it + 1 for it, r in sorted(t.rows.items()) if r.get("feedback", {}).get("band_held")]
        near = [it + 1 for it, r in sorted(t.rows.items())
                if r.get("train", {}).get("near_chance") and it + 1 not in held]
        if near:
            lines.append(Text(f"WARNING: the student was near chance after iteration(s) {near}: its feedback band is "
                              "a random pick", style="bold yellow"))
        if held:
            lines.append(Text(f"the student was near chance after iteration(s) {held}: no band was added there "
                              "(strategy.hold_band_near_chance)", style="yellow"))
        if any(quality(r.get("probe", {})) and not quality(r.get("train", {})) for r in t.rows.values()):
            notes.append("* acc: accuracy on a synthetic hold-out (fresh probes; no real evaluation set)")
        lines.append(Text("\n".join(notes), style="dim"))
        if t.done:
            lines.append(Text(f"finished in {format_seconds(t.elapsed())}", style="bold green"))
        else:
            it, stage = t.current
            where = "final stage" if stage == "final" else f"iteration {it + 1}/{t.iterations or '?'} · {stage}"
            counts = f" · {format_counts(t.live)}" if t.live else ""
            # The stage's ETA only once its rate is measured: "?" would cost the line its 80 columns.
            stage_eta = t.eta_stage()
            eta = (f"stage {format_seconds(stage_eta)}, " if stage_eta is not None else "")
            text = (f"{where} {format_seconds(t.stage_elapsed())}{counts} · ETA {eta}"
                    f"iteration {format_seconds(t.eta_iteration())}, run "
                    f"{format_seconds(t.eta_run())} · elapsed {format_seconds(t.elapsed())}")
            lines.append(Spinner("dots", text=Text(text)))
        total = t.total_stages if t.iterations else None
        lines.append(ProgressBar(total=total, completed=t.finished_stages))
        return Group(*lines)

    def _reasons(self) -> list[tuple[str, int]]:
        counts: dict[str, int] = {}
        for row in self.tracker.rows.values():
            for part in (row.get("generate", {}), row.get("probe", {})):
                for k, v in (part.get("rejected_by_reason") or {}).items():
                    counts[k] = counts.get(k, 0) + int(v)
        return sorted(counts.items(), key=lambda kv: -kv[1])

    def _row_cells(self, it: int, row: dict[str, dict[str, Any]]) -> list[str]:
        gen, probe, train = row.get("generate", {}), row.get("probe", {}), row.get("train", {})
        final = row.get("final")
        rejected = sum(int(part.get("rejected", 0) or 0) for part in (gen, probe))

        def frac(part: dict[str, Any]) -> str:
            return f"{part['accepted']}/{part['requested']}" if "requested" in part else ""

        def num(value: Any, fmt: str) -> str:
            v = _number(value)
            return format(v, fmt) if v is not None else ""

        q = quality(final or train) or quality(probe)
        q_text = f"{q[1]:.3f}" + ("*" if q[0].startswith("hold-out") else "") if q else ""
        seconds = sum(d.get(it, 0.0) for d in self.tracker.durations.values())
        if final is not None:
            return ["final", str(final.get("records", "")), "", "", "", "", num(final.get("train_loss"), ".3f"),
                    q_text, "", format_seconds(seconds)]
        rate = scoring_rate(probe)
        return [str(it + 1), frac(gen), frac(probe), str(rejected) if (gen or probe) else "",
                num(gen.get("tokens_per_s"), ".1f"), f"{rate:.1f}" if rate else "",
                num(train.get("loss"), ".3f"), q_text, str(row["feedback"]["size"]) if "feedback" in row else "",
                format_seconds(seconds)]


REPORTERS: dict[str, type[Reporter]] = {"live": LiveReporter, "plain": PlainReporter, "json": JsonReporter,
                                        "quiet": Reporter}


def resolve_mode(mode: str, stream: TextIO | None = None) -> str:
    """The concrete mode: ``auto`` becomes ``live`` on a terminal and ``plain`` elsewhere."""
    if mode not in MODES:
        raise ValueError(f"progress mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    stream = stream or sys.stdout
    isatty = getattr(stream, "isatty", None)
    return "live" if isatty is not None and isatty() else "plain"


@contextlib.contextmanager
def progress(mode: str = "auto", *, stream: TextIO | None = None, iterations: int = 0, final_ratio: float = 1.0,
             title: str = "", eta: bool = True) -> Iterator[Reporter]:
    """A reporter for the run, opened for its duration (the live view needs start and stop).

    Args:
        mode: ``auto``, ``live``, ``plain``, ``json`` or ``quiet``.
        stream: Where to write; stdout by default.
        iterations: The run's iterations (for the progress bar before the first event).
        final_ratio: See :class:`ProgressTracker`.
        title: Header of the live view.
        eta: Show ETAs (off for streams that mix several runs).

    Yields:
        The reporter: pass it as ``on_event`` and use :meth:`Reporter.message` for run-level lines.
    """
    stream = stream or sys.stdout
    cls = REPORTERS[resolve_mode(mode, stream)]
    reporter = cls(stream, ProgressTracker(iterations=iterations, final_ratio=final_ratio), title, eta)
    with reporter:
        yield reporter
