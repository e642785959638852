"""The one root configuration object, :class:`RunConfig`, and how it is loaded.

Every default of a run lives here. A run is described by a YAML file whose top-level keys are the
sections below; any value can be overridden from the command line with ``--set section.key=value``
(the value is parsed as YAML, so ``--set budget.samples=512`` gives an int). Unknown keys and bad
values are errors that name the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gold_ray.errors import UserError
from gold_ray.run.tasks import format_validation_error


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskConfig(_Section):
    """Which task to distil.

    Attributes:
        name: A shipped task name (``sst2``) or the path of a task YAML file.
        data_dir: Folder that relative data paths (evaluation, seed, validation) are resolved
            against; defaults to ``$GOLD_RAY_DATA``.
        eval_path: Overrides the task file's evaluation JSONL.
        eval_limit: Evaluate on at most this many examples, a seeded subset (None: all).
        iteration_eval_limit: Evaluate each iteration's student on at most this many of them
            (None: as ``eval_limit``). The final student is always evaluated under
            ``eval_limit``; per-iteration accuracy only tracks progress, and on a large
            evaluation set it can cost more than the iteration's training.
        val_path: Small real labelled validation JSONL whose student errors S3 extrapolates;
            default: the task's ``seed_path``. Never the evaluation file (refused).
        unlabeled_path: Unlabelled pool JSONL that LLKD's teacher labels (only the input fields
            are read; labels are dropped); default: the task's ``seed_path``. Never the
            evaluation file (refused).
    """

    name: str = "sst2"
    data_dir: str | None = None
    eval_path: str | None = None
    eval_limit: int | None = Field(default=None, gt=0)
    iteration_eval_limit: int | None = Field(default=None, gt=0)
    val_path: str | None = None
    unlabeled_path: str | None = None


RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
"""Resources with their own settings (``num_cpus`` …): not accepted among the custom ones."""


def check_custom_resources(resources: dict[str, float]) -> dict[str, float]:
    """Refuse a custom-resource mapping Ray would reject or misread (negative amounts, CPU/GPU in it).

    Returns:
        ``resources``, unchanged.

    Raises:
        ValueError: naming the bad entry (pydantic adds the key).
    """
    for name, amount in resources.items():
        if name in RAY_BUILTIN_RESOURCES:
            raise ValueError(f"{name!r} has its own setting (num_cpus/num_gpus), not a custom resource")
        if amount < 0:
            raise ValueError(f"{name!r} must be >= 0, got {amount}")
    return resources


class ServeConfig(_Section):
    """Ray Serve settings of the teacher deployment.

    Attributes:
        min_replicas: Autoscaling floor.
        max_replicas: Autoscaling ceiling.
        target_ongoing_requests: Requests per replica the autoscaler aims for.
        max_ongoing_requests: Requests a replica accepts at once.
        num_cpus: CPUs per replica (what Ray schedules by).
        num_gpus: GPUs per replica.
        threads: Torch threads per replica; None: the node's cores shared among the replicas the
            node can hold (by ``num_cpus``, at most ``max_replicas``). Ray would give a replica one
            thread per CPU it books (one at the default 1 CPU, where the in-process loop uses every
            core), but the teacher computes while the scorers and the trainers wait.
        resources: Custom Ray resources per replica (``{"teacher": 1}`` keeps replicas on the
            nodes that advertise ``teacher``, e.g. ``ray start --resources='{"teacher": 4}'``).
        host: HTTP bind address of ``gold-ray serve``; loopback unless the user exposes it on
            purpose. A distillation opens no HTTP port.
        port: HTTP port of ``gold-ray serve``.
        health_check_period_s: How often Serve runs a replica's health check
            (``TeacherDeployment.check_health``).
        health_check_timeout_s: How long one health check may take, its tiny real generation
            included, before it counts as failed; Serve replaces a replica after three failures
            in a row.
        hang_timeout_s: Longest one engine call may run before the health check calls the
            replica hung. A batch of a large teacher on CPU can take minutes, so this is much
            longer than ``health_check_timeout_s``.
    """

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=64, gt=0)
    max_ongoing_requests: int = Field(default=256, ge=1)
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    threads: int | None = Field(default=None, ge=1)
    resources: dict[str, float] = Field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    health_check_period_s: float = Field(default=10.0, gt=0)
    health_check_timeout_s: float = Field(default=30.0, gt=0)
    hang_timeout_s: float = Field(default=600.0, gt=0)

    @model_validator(mode="after")
    def _replicas(self) -> ServeConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self

    @field_validator("resources")
    @classmethod
    def _custom(cls, value: dict[str, float]) -> dict[str, float]:
        return check_custom_resources(value)


class TeacherConfig(_Section):
    """The teacher LLM and how it samples.

    Attributes:
        model: ``embedded:smollm2-135m-instruct``, ``embedded:gemma3-270m``, an HF id or a local path.
        engine: ``auto`` (``vllm`` where the process building the engine sees a CUDA GPU and
            vLLM is installed, else ``hf``), ``hf`` (transformers with gold-ray's decode loop),
            ``vllm`` or ``openai`` (any OpenAI-compatible endpoint).
        prompt_style: ``chat`` for instruct models, ``continuation`` for base models, ``auto``
            to pick from the tokenizer (a chat template means chat).
        temperature: Sampling temperature.
        top_p: Nucleus sampling mass.
        top_k: Top-k cut (0 disables it).
        max_new_tokens: Cap on generated tokens per sample.
        batch_size: Prompts per engine call.
        dtype: ``auto`` (bf16 where the CPU or GPU has it), ``bfloat16``, ``float32`` or ``float16``.
        trust_remote_code: Run model code from the model folder; off unless turned on.
        base_url: OpenAI engine endpoint (``http://host:port/v1``).
        api_key_env: Environment variable holding the OpenAI engine's key; the key itself is never
            stored in a config.
        request_timeout_s: Per-request timeout of the OpenAI engine.
        max_retries: Retries of a failed request, with exponential backoff.
        retry_backoff_s: The first retry's delay; it doubles per retry (the Ray pipeline caps it at
            30 s). Used by the OpenAI engine and by the Ray pipeline's re-runs of failed prompts.
        vllm_cpu_kv_cache_gib: KV cache the ``vllm`` engine reserves on a CPU-only host, in GiB
            (``VLLM_CPU_KVCACHE_SPACE``, which wins when set). Without it vllm-cpu sizes the
            cache from free RAM and refuses to start on a host with less than 92 % of it free.
        prompts_per_demo_set: How many prompts share one set of demonstrations. Prompts of one
            label are grouped by this many and each group draws one demo set (groups draw
            different ones), with the per-prompt parts (style hint, GOLD's probe request) after the
            demos, so a group's prompts share a long token prefix that the ``hf`` engine computes
            once, vLLM caches and the Serve router sends to one replica. 1: every prompt draws its
            own demos, as GOLD's authors do. The default 8 was chosen for speed (1.19 x the
            teacher's samples/s of 1 on the demo's prompts, ``benchmarks/perf/results/
            generation_prefix.md``) and checked for harm: the generated data's diversity (distinct
            word pairs, nearest-other overlap) stayed level, and over 3 seeds on SST-2 GOLD scored
            level with runs at 1 (within its seed spread) and ZeroGen 2.1 points higher
            (``benchmarks/quality/demo_sets.sh``).
        check_labels: Classification: the teacher reads every sample it wrote back as a few-shot
            classifier (its seed demos, one scoring pass per label, as the teacher row does), and a
            sample it reads as another label than the one it was asked to write is rejected
            (reason ``label_check``, kept in the rejects part with the label it read). A small
            teacher asked for a label often writes text of another: the embedded teacher read 37 to
            41 % of its own SST-2 samples as the other label (two runs, 248 and 991 samples), and
            students trained on the samples it agreed with did better on SST-2's ``seed.jsonl``
            (``benchmarks/quality/results/selection.md``). Off by default: where the teacher is a
            poor, biased classifier the check keeps mostly one label (AG News: it rejected 56 to
            61 % of the samples, and GOLD's and ZeroGen's students fell to 57 and 69 %, against
            83 to 84 % without it; ``results/with-label-check/``). Turn it on where the teacher row
            is well above chance (the demo does). The check stands down for a batch (rejects
            nothing, says why in the log and in ``label_check.skipped``) when the teacher agrees with
            itself far more on some labels than on others, or no more than chance
            (:func:`gold_ray.run.loop.label_check_skip_reason`). The check costs a forward pass per
            sample and label. LLKD, whose teacher labels every text itself, skips it.
        serve: The Ray Serve deployment.
    """

    model: str = "embedded:smollm2-135m-instruct"
    engine: Literal["auto", "hf", "vllm", "openai"] = "auto"
    prompt_style: Literal["auto", "chat", "continuation"] = "auto"
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    max_new_tokens: int = Field(default=64, ge=1)
    batch_size: int = Field(default=64, ge=1)
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    trust_remote_code: bool = False
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    request_timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=3, ge=0)
    retry_backoff_s: float = Field(default=1.0, ge=0)
    vllm_cpu_kv_cache_gib: int = Field(default=4, ge=1)
    prompts_per_demo_set: int = Field(default=8, ge=1)
    check_labels: bool = False
    serve: ServeConfig = Field(default_factory=ServeConfig)


class StudentConfig(_Section):
    """The student model and how it trains.

    Attributes:
        model: ``embedded:all-minilm-l6-v2``, an HF id or a local path.
        kind: ``auto`` (classifier for classification tasks, seq2seq/causal LM for text-to-text),
            ``classifier`` or ``text_to_text``.
        max_length: Tokens per input.
        max_target_length: Tokens per target (text-to-text).
        lr: Peak AdamW learning rate (after a linear warm-up, then linear decay). 1e-4 rather than
            the usual 5e-5 for fine-tuning: the classification head starts from random, and at
            5e-5 a few hundred generated samples left it at chance (issue 17's measurements).
        batch_size: Training batch size.
        weight_decay: AdamW weight decay.
        epochs_per_iteration: Pins each iteration's epochs (no step floor, no early stopping);
            None trains until the synthetic validation loss stops improving, with at least
            ``min_steps_per_iteration`` steps and at most ``max_epochs`` epochs.
        min_steps_per_iteration: The step floor of each iteration's training: a fresh head needs
            tens of optimiser steps before its energies mean anything.
        final_epochs: Pins the final stage's epochs; None: the step floor ``final_min_steps`` sets
            them (at most ``max_epochs``). Either way the final training keeps its last epoch: the
            synthetic validation split is measured (and chooses among ``final_loss`` candidates)
            but picks no epoch, since on it the loss rises with a confident student while accuracy
            on real data still improves (``benchmarks/quality/results/selection.md``).
        final_min_steps: The step floor of the final training.
        max_epochs: Most epochs the step floor may raise a training to.
        patience: Stop an iteration's training (once past its step floor) when its synthetic
            validation loss has not improved for this many epochs; the best epoch's weights are kept.
        warmup: Share of a training's planned steps with a linearly rising learning rate.
        val_share: Seeded share of the generated records held out as the synthetic validation split
            (early stopping, the final recipe). Without a real evaluation set, the same share is also
            held out as a synthetic test split that nothing trains or chooses on.
        final_fresh: Re-initialise the student before the final stage (the GOLD code does).
        final_loss: ``auto``: choose between the strategy's own loss (SCE for GOLD, CE for the
            others) and the other one on the synthetic validation split, keeping the strategy's own
            unless the other is better by more than the split's noise; the strategy's own when the
            split is too small. ``own``: the strategy's own loss, with no other trained (half the
            final stage's time). ``ce`` or ``sce`` pins one for every strategy.
        final_lrs: Learning rates the final recipe is chosen among (None: ``lr`` alone). Each
            adds a training per loss: the final stage trains at most ``2 * len(final_lrs)`` times.
        sce_alpha: Weight of the CE term of SCE. 0.1 (with beta 1) had the best mean accuracy on
            SST-2's ``seed.jsonl`` over GOLD and ZeroGen runs at 1,000 samples, against CE and alpha 1
            (``benchmarks/quality/results/sst2-recipes-n1000.md``); the GOLD authors' SVAMP command
            uses 0.1 as well.
        sce_beta: Weight of the reverse CE term of SCE.
        precision: What training computes in: ``auto`` is bfloat16 mixed precision where the device
            does it fast (a CUDA GPU that supports it; a CPU with AMX-BF16 or AVX512-BF16) and
            float32 elsewhere; ``bfloat16`` or ``float32`` pins one. Weights and optimiser state
            stay float32; scoring and prediction compute in float32. On a 2-core AMX CPU the final
            training of the embedded student ran 1.68 x faster per step in bfloat16, at the same
            accuracy (``benchmarks/perf/results/training-precision.md``, six runs, five tasks).
        trust_remote_code: See ``TeacherConfig.trust_remote_code``.
    """

    model: str = "embedded:all-minilm-l6-v2"
    kind: Literal["auto", "classifier", "text_to_text"] = "auto"
    max_length: int = Field(default=128, ge=8)
    max_target_length: int = Field(default=32, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    batch_size: int = Field(default=32, ge=1)
    weight_decay: float = Field(default=0.01, ge=0)
    epochs_per_iteration: int | None = Field(default=None, ge=0)
    min_steps_per_iteration: int = Field(default=60, ge=0)
    final_epochs: int | None = Field(default=None, ge=0)
    final_min_steps: int = Field(default=150, ge=0)
    max_epochs: int = Field(default=20, ge=1)
    patience: int = Field(default=2, ge=0)
    warmup: float = Field(default=0.1, ge=0, lt=1)
    val_share: float = Field(default=0.1, ge=0, lt=0.5)
    final_fresh: bool = True
    final_loss: Literal["auto", "own", "ce", "sce"] = "auto"
    final_lrs: list[float] | None = None
    sce_alpha: float = Field(default=0.1, ge=0)
    sce_beta: float = Field(default=1.0, ge=0)
    precision: Literal["auto", "bfloat16", "float32"] = "auto"
    trust_remote_code: bool = False


class StrategyConfig(_Section):
    """Which data strategy runs the loop, and its knobs.

    Attributes:
        name: ``gold``, ``zerogen``, ``progen``, ``s3`` or ``llkd``.
        iterations: Feedback rounds.
        probe_fraction: Share of each iteration's generation spent on probe samples (GOLD).
        band_lo: Lower energy percentile of the feedback band (GOLD code: 0.5).
        band_hi: Upper energy percentile of the feedback band (GOLD code: 0.8).
        feedback_per_prompt: Feedback examples shown in one prompt.
        feedback_pool_size: Most recent feedback examples kept.
        demos_per_prompt: Seed demonstrations shown in one prompt.
        score: OOD score used for selection: ``energy``, ``nll`` or ``msp``; ``random`` is the
            ablation control (a fixed hash of each text, so the band picks probes at random).
        energy_temperature: T in E = -T logsumexp(f/T).
        energy_mode: ``masked`` (real target tokens only, the clean reading) or ``code_faithful``
            (pads included, as the GOLD code does); text-to-text students only.
        noise_filter_top: Drop this top share of each iteration's training data by energy (0 = off).
        band_length_quantile: GOLD: only probes no longer than this quantile of iteration 0's
            accepted training samples (characters of the input fields) enter the band, which is
            then taken over them (0 = off). Feedback otherwise drifts to long samples on tasks of
            short texts (CoLA: 57 to 102 characters over four iterations, real sentences 42).
        hold_band_near_chance: GOLD: when the student that scored an iteration's probes is near
            chance (the learning check of its training stage: synthetic validation accuracy
            within 5 points of that split's majority share, or a CE loss near ln K), no band is
            added that iteration and the feedback pool stays as it was, since that student's
            energy ranks the probes at random (off: the band is added whatever the student).
        max_demo_chars: Length cap of one demonstration inside a prompt.
        progen_val_fraction: ProGen: share of the synthetic data held out of in-loop training as
            the synthetic validation set that influence is measured on.
        progen_feedback_ratio: ProGen: probability that a prompt shows feedback examples (the
            code's ``feedback_ratio`` p = 0.5).
        progen_damping: ProGen: damping added to the Hessian before it is inverted (the code's
            L2 term 0.005 ||theta||^2 gives 0.01).
        progen_max_candidates: ProGen: most training records scored by influence per round (a
            seeded random subset beyond it; the code scores 10,000).
        s3_error_share: S3: share of each later iteration's prompts that extrapolate the student's
            validation errors (the rest are ordinary label-conditioned prompts; 1.0 is the paper's
            errors-only rounds).
        llkd_momentum: LLKD: momentum of the class-wise adaptive thresholds, per iteration (0
            uses the current iteration's statistics alone).
        llkd_calibration: LLKD: ``batch`` divides the teacher's label probabilities by their mean
            over every text labelled so far before taking its label and confidence (batch
            calibration, no labels used); ``none`` takes the raw label-word scores.
    """

    name: Literal["gold", "zerogen", "progen", "s3", "llkd"] = "gold"
    iterations: int = Field(default=4, ge=1)
    probe_fraction: float = Field(default=0.2, ge=0, lt=1)
    band_lo: float = Field(default=0.5, ge=0, le=1)
    band_hi: float = Field(default=0.8, ge=0, le=1)
    feedback_per_prompt: int = Field(default=3, ge=0)
    feedback_pool_size: int = Field(default=32, ge=1)
    demos_per_prompt: int = Field(default=3, ge=0)
    score: Literal["energy", "nll", "msp", "random"] = "energy"
    energy_temperature: float = Field(default=1.0, gt=0)
    energy_mode: Literal["masked", "code_faithful"] = "masked"
    noise_filter_top: float = Field(default=0.0, ge=0, lt=1)
    band_length_quantile: float = Field(default=0.0, ge=0, le=1)
    hold_band_near_chance: bool = False
    max_demo_chars: int = Field(default=300, ge=20)
    progen_val_fraction: float = Field(default=0.2, gt=0, le=0.5)
    progen_feedback_ratio: float = Field(default=0.5, ge=0, le=1)
    progen_damping: float = Field(default=0.01, gt=0)
    progen_max_candidates: int = Field(default=2000, ge=2)
    s3_error_share: float = Field(default=0.5, ge=0, le=1)
    llkd_momentum: float = Field(default=0.5, ge=0, lt=1)
    llkd_calibration: Literal["batch", "none"] = "batch"

    @model_validator(mode="after")
    def _band(self) -> StrategyConfig:
        if self.band_lo >= self.band_hi:
            raise ValueError(f"band_lo ({self.band_lo}) must be below band_hi ({self.band_hi})")
        return self


class BudgetConfig(_Section):
    """How much teacher work a run may spend.

    Attributes:
        samples: Samples requested from the teacher over the whole run, probes included (GOLD's
            probes are training data too), so every strategy spends the same teacher calls.
        max_teacher_tokens: Stop generating once this many output tokens were spent (None: no cap).
            Checked before each iteration's generate stage: a coarse safety cap, overshooting by
            up to an iteration's samples.
        teacher_tokens: Hold the teacher's output tokens equal instead of its samples (None: off).
            Strategies at the same ``samples`` do not spend the same teacher compute (GOLD's
            feedback prompts draw longer answers than ZeroGen's); with this set, a run stops
            asking the teacher once its output tokens reach it. The tokens are spread over the
            stages as the samples are (a stage may spend its share of the tokens spent so far, in
            chunks of ``teacher.batch_size`` prompts, so it overshoots by at most one chunk), and
            ``samples`` stays the most samples a run asks for: set it high enough that the tokens,
            not the samples, run out. Scored label prompts (LLKD) spend no output tokens.
        max_reject_share: Stop with a clear error when an iteration rejects more than this share.
    """

    samples: int = Field(default=1024, ge=1)
    max_teacher_tokens: int | None = Field(default=None, ge=1)
    teacher_tokens: int | None = Field(default=None, ge=1)
    max_reject_share: float = Field(default=0.9, gt=0, le=1)


class BaselinesConfig(_Section):
    """The references a finished run's student is shown beside: the majority class and the teacher
    itself as a few-shot classifier, on the student's evaluation examples (the synthetic test split
    when there is no real evaluation set).

    Attributes:
        teacher_fewshot: Evaluate the teacher as a few-shot classifier at the end of the run (one
            forward pass per example and label, through the run's teacher: minutes on a CPU for a
            few hundred examples). The result is cached under the models cache
            (``$GOLD_RAY_CACHE/baselines``) per teacher, task, evaluation examples, prompt style and
            demonstrations, so later runs and ``gold-ray compare`` reuse it.
        teacher_fewshot_limit: Evaluate the teacher on at most this many of the evaluation examples
            (a seeded subset; None: all of them). The majority class is always computed on all.
    """

    teacher_fewshot: bool = True
    teacher_fewshot_limit: int | None = Field(default=1000, ge=1)


class ResourcesConfig(_Section):
    """Ray resources of the scoring pool and the trainer.

    Attributes:
        scorer_min_actors: Smallest energy-scorer actor pool; None (the default) means
            ``scorer_max_actors``: a pool that grows starts its later actors when a GOLD
            iteration's few hundred samples are nearly scored (measured on 2 cores, steady rate
            21.6 samples/s growing from 1 actor, 94 starting with 2).
        scorer_max_actors: Largest energy-scorer actor pool.
        scorer_num_cpus: CPUs per scorer actor.
        scorer_num_gpus: GPUs per scorer actor.
        scorer_batch_size: Rows per scoring batch.
        scorer_resources: Custom Ray resources per scorer actor (and per evaluation task), e.g.
            ``{"scorer": 1}`` to place them on the nodes that advertise it.
        train_workers: Ray Train workers.
        train_use_gpu: Train on GPUs.
        train_cpus_per_worker: CPUs per Ray Train worker (what Ray schedules by).
        train_threads_per_worker: Torch threads per Ray Train worker; None: the node's cores shared
            among the node's training workers, as the in-process loop uses them all. Ray would give
            a worker one thread per CPU it holds (one at the default 1 CPU, where the in-process
            loop uses every core), but training runs while the teacher and the scorers wait, so
            the cores Ray books for them lie idle.
        train_resources_per_worker: Custom Ray resources per Ray Train worker, e.g. ``{"trainer": 1}``.
        train_checkpoint_every_s: Least seconds between two Ray Train checkpoints of a training
            (the last epoch is always checkpointed; 0: every epoch). A worker that fails resumes from
            the latest one. The embedded student's checkpoint with its optimiser state is 348 MB
            (0.4 to 2.3 s to write on 2 cores, then Ray Train copies it to storage), while an epoch
            of a few hundred generated records takes seconds.
        train_keep_workers: Keep one Ray Train worker group for the whole run, started with the
            teacher, and send it every training (its start-up, about 10 s on 2 cores, is paid once);
            False starts a group per training and frees its CPUs (and GPUs) in between.
        train_max_failures: Times Ray Train restarts a training's worker group after a worker
            dies (Ray Train's ``FailureConfig.max_failures``), each from the latest checkpoint;
            one failure more ends the training with an error, and the next training starts a new group.
        local_ray_cpus: Logical CPUs of a Ray started locally (no ``$RAY_ADDRESS``); None means
            enough for everything a run books at once (the teacher's replicas at their most, the
            scorers, the training workers and the teacher caller), and at least the machine's
            cores and 4: a teacher, the scorer pool and a trainer share a 2-core laptop's cores,
            as they rarely compute at the same time, but each must be placed.
    """

    scorer_min_actors: int | None = Field(default=None, ge=1)
    scorer_max_actors: int = Field(default=2, ge=1)
    scorer_num_cpus: float = Field(default=0.5, gt=0)
    scorer_num_gpus: float = Field(default=0.0, ge=0)
    scorer_batch_size: int = Field(default=64, ge=1)
    scorer_resources: dict[str, float] = Field(default_factory=dict)
    train_workers: int = Field(default=1, ge=1)
    train_use_gpu: bool = False
    train_cpus_per_worker: float = Field(default=1.0, gt=0)
    train_threads_per_worker: int | None = Field(default=None, ge=1)
    train_resources_per_worker: dict[str, float] = Field(default_factory=dict)
    train_checkpoint_every_s: float = Field(default=30.0, ge=0)
    train_keep_workers: bool = True
    train_max_failures: int = Field(default=2, ge=0)
    local_ray_cpus: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _pool(self) -> ResourcesConfig:
        if self.scorer_min_actors is not None and self.scorer_min_actors > self.scorer_max_actors:
            raise ValueError("scorer_min_actors must be <= scorer_max_actors")
        return self

    @field_validator("scorer_resources", "train_resources_per_worker")
    @classmethod
    def _custom(cls, value: dict[str, float]) -> dict[str, float]:
        return check_custom_resources(value)


class TrackingConfig(_Section):
    """MLflow tracking.

    Attributes:
        enabled: Log the run to MLflow.
        tracking_uri: MLflow store; None means ``$MLFLOW_TRACKING_URI`` or else a SQLite file
            in the output folder.
        experiment: MLflow experiment name.
        parent_run_id: Nest the run under this MLflow run (in the same store); ``gold-ray
            compare`` sets it so that every run of a comparison sits under one parent.
    """

    enabled: bool = True
    tracking_uri: str | None = None
    experiment: str = "gold-ray"
    parent_run_id: str | None = None


class OutputConfig(_Section):
    """Where a run writes.

    Attributes:
        dir: Run directory.
        overwrite: Replace a different run already in ``dir``.
        fork_from: A run directory whose first teacher pass (iteration 0's training samples and
            probes, as it committed them) a new run in ``dir`` starts from, instead of asking the
            teacher for them again: two runs that differ only in what comes after that pass (the
            score that picks the band, the student and its training) then share it exactly. The
            configs must agree on everything the pass depends on (:data:`gold_ray.run.fork.FREE_KEYS`
            lists what may differ). Used when the run starts anew in ``dir`` (also after
            ``overwrite`` replaced one, which happens only once the fork is checked); a resume of
            a run already there ignores it.
    """

    dir: str = "runs/latest"
    overwrite: bool = False
    fork_from: str | None = None


class RunConfig(_Section):
    """The whole description of one distillation run.

    Attributes:
        seed: Seeds prompts, sampling and training.
        task: See :class:`TaskConfig`.
        teacher: See :class:`TeacherConfig`.
        student: See :class:`StudentConfig`.
        strategy: See :class:`StrategyConfig`.
        budget: See :class:`BudgetConfig`.
        baselines: See :class:`BaselinesConfig`.
        resources: See :class:`ResourcesConfig`.
        tracking: See :class:`TrackingConfig`.
        output: See :class:`OutputConfig`.
    """

    seed: int = 0
    task: TaskConfig = Field(default_factory=TaskConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    baselines: BaselinesConfig = Field(default_factory=BaselinesConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    def to_yaml(self) -> str:
        """The resolved config, every default included, as YAML."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def per_iteration_samples(self) -> int:
        """Teacher samples (training and probes) per iteration; the last iteration takes the remainder."""
        return max(1, self.budget.samples // self.strategy.iterations)


class ConfigError(UserError, ValueError):
    """A config that does not load; the message names the file, the key and the problem."""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw config mapping (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. strategy.name=zerogen")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {err}") from err
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a :class:`RunConfig` from YAML (or the defaults when ``path`` is None), then apply overrides.

    Raises:
        ConfigError: the file is missing or not YAML, or a key is unknown or a value invalid;
            the message names each bad key.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: no such config file")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"{source}: not valid YAML: {err}") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: expected a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    data = apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{_blamed(source, err, overrides or [])}:\n{format_validation_error(err)}") from err


def _blamed(source: str, err: ValidationError, overrides: list[str]) -> str:
    # A bad key typed on the command line is named as the override's, not as the config file's.
    keys = [o.split("=", 1)[0].strip() for o in overrides]

    def overridden(loc: tuple[Any, ...]) -> bool:
        dotted = ".".join(str(x) for x in loc)
        return any(k == dotted or k.startswith(dotted + ".") or dotted.startswith(k + ".") for k in keys)

    marks = [overridden(e["loc"]) for e in err.errors()]
    if marks and all(marks):
        return "--set overrides"
    return f"{source} with its --set overrides" if any(marks) else source
