"""The strategy interface: what to ask the teacher, what to feed back, what to keep, how to train.

One iteration of every strategy runs the same stages (see :mod:`gold_ray.run.loop` and the Ray driver):

1. ``train_prompts``: the teacher writes training samples (label-conditioned, with demonstrations).
2. The student trains on everything kept so far (``continue_student`` decides whether it continues
   or restarts from the pretrained weights each round).
3. ``probe_prompts``: the teacher writes probe samples (GOLD: "significantly different" ones);
   the student scores them (energy by default). A strategy whose probe prompts are known before
   training (``probes_before_training``, GOLD) has them written in step 1's teacher pass; step 3
   then only scores them.
4. ``update_feedback``: the strategy picks the examples that go into the next prompts.
5. ``keep_for_training``: which accepted samples become training data.

The final student is trained on all kept data with ``final_loss`` (the strategy's own loss unless
``student.final_loss`` names one for every strategy).

Hooks that only some strategies use (defaults do nothing):

- ``prepare``: load the strategy's inputs once per run (S3's real validation set, LLKD's
  unlabelled pool) into ``StrategyContext.extra``; refuse inputs that are the evaluation file.
- ``label_prompts``: after the generate stage, ``classify`` prompts the teacher answers in a
  second pass of the same stage; their labelled records (after ``review_labels``) become the
  iteration's training data and the written texts are kept apart (LLKD).
- ``train_mask``: which records the in-loop training stage uses (ProGen holds its synthetic
  validation split out; LLKD trains on its current selection).
- ``StrategyContext.memory``: strategy state committed with every stage (LLKD's thresholds), so a
  resumed run continues from exactly what was committed.

This shape holds all five methods of the specification: ZeroGen (no probes, no feedback), GOLD
(energy-band feedback from probes), ProGen (feedback chosen by influence), S3 (feedback from the
student's errors on a small real validation set) and LLKD (the teacher labels an unlabelled pool:
its prompts are ``classify`` prompts that carry the unlabelled record in ``Prompt.meta["record"]``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gold_ray.config import ConfigError, RunConfig, StudentConfig
from gold_ray.run.tasks import TaskSpec, resolve_data_path
from gold_ray.teacher.prompts import draw_style, render_probe_prompt, render_train_prompt
from gold_ray.types import Prompt


@dataclass
class StrategyContext:
    """What a strategy may read when it plans an iteration.

    Attributes:
        task: The task.
        config: The whole run config.
        prompt_style: ``chat`` or ``continuation``, resolved from the teacher.
        rng: The run's seeded generator for this iteration (labels, styles, demo order).
        iteration: 0-based iteration index.
        feedback: The current feedback pool (records), oldest first.
        student: The current student, or None before the first training stage.
        student_near_chance: Whether this iteration's training stage found its student near
            chance (:func:`gold_ray.student.training.learning_check`); False before it trained.
        extra: Strategy-specific inputs from :meth:`Strategy.prepare` (S3's validation records,
            LLKD's unlabelled pool); read-only.
        memory: Strategy state that the loop commits with the stage (JSON-serialisable); a
            strategy may change it in place.
        records: Returns every accepted training record committed so far (loaded on demand).
        stats: Numbers the strategy reports for the stage; merged into the stage's metrics.
    """

    task: TaskSpec
    config: RunConfig
    prompt_style: str
    rng: np.random.Generator
    iteration: int
    feedback: list[dict[str, Any]] = field(default_factory=list)
    student: Any = None
    student_near_chance: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    records: Callable[[], list[dict[str, Any]]] = list
    stats: dict[str, Any] = field(default_factory=dict)


def resolve_strategy_input(
    cfg: RunConfig, task: TaskSpec, field_name: str, eval_file: Path | None, what: str
) -> Path | None:
    """The file named by ``task.<field_name>`` in the run config, else the task's ``seed_path``.

    Relative paths resolve against ``task.data_dir`` or ``$GOLD_RAY_DATA``. The evaluation file is
    refused: a strategy input is real data the strategy learns from, so it must never be the data
    the student is tested on.

    Args:
        cfg: The run config.
        task: The task (its ``seed_path`` is the default).
        field_name: ``val_path`` or ``unlabeled_path`` (a :class:`~gold_ray.config.TaskConfig` field).
        eval_file: The run's resolved evaluation file, or None.
        what: What the file is, for messages ("S3's validation set").

    Returns:
        The resolved path, or None when neither the config nor the task names a file.

    Raises:
        ConfigError: the path is relative and no data folder is set, the file does not exist, or
            it is the evaluation file; the message names the field.
    """
    configured = getattr(cfg.task, field_name)
    source = f"task.{field_name}" if configured else f"task.{field_name} (default: the task's seed_path)"
    raw = configured or task.seed_path
    if not raw:
        return None
    try:
        path = resolve_data_path(raw, cfg.task.data_dir)
    except FileNotFoundError as err:
        raise ConfigError(f"{source}: {err}") from None
    if not path.is_file():
        raise ConfigError(f"{source}: {what} {str(path)!r} does not exist")
    if eval_file is not None and Path(eval_file).is_file() and path.resolve() == Path(eval_file).resolve():
        raise ConfigError(
            f"{source}: {what} {str(path)!r} is the evaluation (test) file; "
            "use real data that is not the test set (e.g. the task's seed.jsonl)"
        )
    return path


def balanced_labels(task: TaskSpec, n: int, rng: np.random.Generator) -> list[str | None]:
    """``n`` target labels, as even across the label set as ``n`` allows, in shuffled order.

    Text-to-text tasks have no labels and get ``None`` for each sample.
    """
    if not task.is_classification:
        return [None] * n
    names = task.label_names
    labels = [names[i % len(names)] for i in range(n)]
    rng.shuffle(labels)
    return labels


DEMO_SET_REDRAWS = 8
"""Draws a demo group makes at most to find a demo set no earlier group of the call has."""


def demo_groups(labels: list[str | None], size: int) -> list[tuple[str | None, int]]:
    """``labels`` cut into groups of at most ``size`` prompts of one label: ``(label, count)`` each.

    A group shares one demo set, drawn for its label exactly as one prompt's would be (same label
    first, a strategy's per-label feedback), so only the style hint and the request for the one
    sample differ inside a group. Groups follow the order in which labels first appear in
    ``labels`` and every label keeps its count, so the label balance is unchanged.
    """
    counts: dict[str | None, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return [(label, min(size, total - start)) for label, total in counts.items()
            for start in range(0, total, size)]


class Strategy:
    """A data-generation strategy. Subclasses set ``name`` and override what differs.

    Attributes:
        name: The strategy's config name.
        uses_probes: Whether the strategy generates probe samples each iteration.
        probes_before_training: Whether :meth:`probe_prompts` depends only on what is known
            before the iteration's training stage (the feedback pool, the stage's seeded ``rng``),
            not on ``ctx.student`` or on ``ctx.memory`` changed by this iteration. Then the loop
            sends the training and probe prompts to the teacher in one pass in the generate stage,
            and the probe stage only scores the written probes with the newly trained student.
            Such a strategy's ``probe_prompts`` gets the probe stage's context (its ``rng``) but
            before training, so ``ctx.student`` is still the previous iteration's.
        continue_student: Keep training the same student across iterations (GOLD) rather than
            restarting from the pretrained weights each round (ProGen, S3).
        default_final_loss: The final stage's loss under ``student.final_loss`` ``auto`` or
            ``own``: ``ce``, or ``sce`` where the method's paper trains with it (GOLD).
        teacher_labels: The teacher labels the written texts itself (LLKD), so the label check of
            ``teacher.check_labels`` would only ask it the same question twice: skipped.
    """

    name: str = "base"
    uses_probes: bool = False
    probes_before_training: bool = False
    continue_student: bool = True
    default_final_loss: str = "ce"
    teacher_labels: bool = False

    def seed_demos_for(self, ctx: StrategyContext, label: str | None) -> list[dict[str, Any]]:
        """``strategy.demos_per_prompt`` of the task's seed demos in a random order, ``label``'s first."""
        seeds = list(ctx.task.seed_demos)
        order = ctx.rng.permutation(len(seeds))
        seeds = [seeds[i] for i in order]
        if label is not None:
            # Show demos of other labels too, so the teacher sees the contrast.
            seeds.sort(key=lambda d: d.get("label") != label)
        return seeds[: ctx.config.strategy.demos_per_prompt]

    def demos_for_prompt(self, ctx: StrategyContext, label: str | None) -> list[dict[str, Any]]:
        """Demonstrations for one prompt: seed demos (same label first), then feedback examples."""
        cfg = ctx.config.strategy
        demos = self.seed_demos_for(ctx, label)
        if ctx.feedback and cfg.feedback_per_prompt:
            k = min(cfg.feedback_per_prompt, len(ctx.feedback))
            picks = ctx.rng.choice(len(ctx.feedback), size=k, replace=False)
            demos += [ctx.feedback[int(i)] for i in picks]
        return demos

    def _prompts(self, ctx: StrategyContext, n: int, probe: bool) -> list[Prompt]:
        """``n`` label-balanced prompts; with ``teacher.prompts_per_demo_set`` above 1, grouped
        (:func:`demo_groups`) so that the prompts of a group share one draw of demonstrations."""
        render = render_probe_prompt if probe else render_train_prompt
        labels = balanced_labels(ctx.task, n, ctx.rng)
        per_set = ctx.config.teacher.prompts_per_demo_set
        # Draw order at 1 is the same as before groups existed: demos, then style, per prompt.
        groups = demo_groups(labels, per_set) if per_set > 1 else [(label, 1) for label in labels]
        prompts = []
        seen: set[str] = set()
        for label, size in groups:
            demos = self.demos_for_prompt(ctx, label)
            if per_set > 1:
                # A group stands for several prompts' draws: with few seed demos two groups can
                # draw the same set, so a repeat is drawn again (a few times, from the same stream).
                for _ in range(DEMO_SET_REDRAWS):
                    if repr(demos) not in seen:
                        break
                    demos = self.demos_for_prompt(ctx, label)
                seen.add(repr(demos))
            for _ in range(size):
                prompts.append(
                    render(
                        ctx.task,
                        label,
                        demos,
                        style=draw_style(ctx.task, ctx.rng),
                        prompt_style=ctx.prompt_style,
                        max_demo_chars=ctx.config.strategy.max_demo_chars,
                    )
                )
        return prompts

    def prepare(self, task: TaskSpec, cfg: RunConfig, eval_file: Path | None) -> dict[str, Any]:
        """Load the strategy's inputs once per run (they become ``StrategyContext.extra``).

        Args:
            task: The task.
            cfg: The run config.
            eval_file: The run's resolved evaluation file (inputs must never be it), or None.

        Returns:
            Read-only inputs (any Python objects; they are not committed, ``prepare`` runs again
            on resume); the default strategy needs none.

        Raises:
            ConfigError: an input is missing, malformed or the evaluation file.
        """
        return {}

    def train_prompts(self, ctx: StrategyContext, n: int) -> list[Prompt]:
        """Prompts for ``n`` training samples."""
        return self._prompts(ctx, n, probe=False)

    def label_prompts(self, ctx: StrategyContext, written: list[dict[str, Any]], n: int) -> list[Prompt]:
        """``classify`` prompts answered after the generate stage's first pass (default: none).

        When this returns prompts, the labelled records they give become the iteration's training
        data, and ``written`` (the accepted texts of the first pass) is kept as a ``pool`` part
        that is not trained on.

        Args:
            ctx: The generate stage's context (the same object ``train_prompts`` got).
            written: Accepted records of the stage's first pass.
            n: Teacher calls left in the stage's budget; prompts beyond ``n`` are not sent.
        """
        return []

    def review_labels(self, ctx: StrategyContext, labelled: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The labelled records of the stage's labelling pass, as they will be written (default: unchanged).

        ``ctx.records()`` still holds only earlier iterations' records here.
        """
        return labelled

    def train_mask(self, ctx: StrategyContext, records: list[dict[str, Any]]) -> list[bool]:
        """Which records the in-loop training stage trains on (default: all of them).

        ``ctx.student`` is the student about to be trained (fresh in the first iteration, or
        when the strategy does not continue the student).
        """
        return [True] * len(records)

    def probe_prompts(self, ctx: StrategyContext, n: int) -> list[Prompt]:
        """Prompts for ``n`` probe samples (empty unless ``uses_probes``)."""
        return self._prompts(ctx, n, probe=True) if self.uses_probes else []

    def update_feedback(self, ctx: StrategyContext, probes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The next feedback pool, given this iteration's scored, accepted probe records."""
        return []

    def keep_for_training(self, ctx: StrategyContext, records: list[dict[str, Any]]) -> list[bool]:
        """Which accepted records become training data (default: all of them)."""
        return [True] * len(records)

    def final_loss(self, ctx: StrategyContext) -> tuple[str, float, float]:
        """Loss of the final training stage: (``ce`` or ``sce``, alpha, beta).

        ``student.final_loss`` ``auto`` or ``own`` means the strategy's own :attr:`default_final_loss`;
        ``ce`` or ``sce`` applies to every strategy (for like-for-like comparisons).
        """
        return self.final_loss_for(ctx.config.student)

    def final_loss_for(self, student: StudentConfig) -> tuple[str, float, float]:
        """:meth:`final_loss` from the ``student`` config section alone (for tools that read a run's config)."""
        loss = self.default_final_loss if student.final_loss in ("auto", "own") else student.final_loss
        return loss, student.sce_alpha, student.sce_beta
