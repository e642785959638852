"""Student models: the small model GOLD trains on generated data and scores fresh samples with.

One interface, :class:`Student`, two implementations:

- :class:`ClassifierStudent`: any HF encoder (or decoder) with a sequence-classification head
  (``AutoModelForSequenceClassification``), class logits in ``task.label_names`` order.
- :class:`TextToTextStudent`: any HF seq2seq LM (T5) or causal LM. The input is built from the
  task's fields as ``"{display}: {value}"`` lines and the target is the target string (for a
  classification task, the label's verbalizer, as the GOLD code does with T5).

Records are plain dicts with the task's input fields and its target key (``label`` or the target
field). Training is deterministic given ``seed``: the batch order comes from
``numpy.random.default_rng(seed)`` and dropout from a seeded, forked torch RNG (the caller's global
RNG state is left untouched).

Training is :func:`gold_ray.student.training.fit` (AdamW created afresh per call, gradient clipping at
norm 1, the schedule and budget of a :class:`~gold_ray.student.training.Recipe`), the same loop the Ray
Train workers run.

Only safetensors weights are ever loaded (``use_safetensors=True``), and saving writes
safetensors.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from gold_ray.config import StudentConfig
from gold_ray.devices import default_device, training_dtype
from gold_ray.errors import InputError
from gold_ray.models import allow_remote_code
from gold_ray.run.tasks import TaskSpec
from gold_ray.student import ood, training
from gold_ray.student.losses import loss_fn
from gold_ray.student.training import Recipe

META_FILE = "gold_ray_student.json"
"""Written next to the HF files by :meth:`Student.save`: kind, task, labels, settings."""

Schedule = Literal["linear", "constant"]

_SETTINGS = ("max_length", "batch_size", "lr", "weight_decay", "seed", "schedule", "precision")


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch inside the block without changing the caller's RNG state afterwards."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _chunks(records: Sequence[dict], size: int) -> Iterator[list[dict]]:
    for start in range(0, len(records), size):
        yield list(records[start : start + size])


def _field(record: dict, name: str) -> str:
    try:
        value = record[name]
    except KeyError:
        raise ValueError(f"record has no field {name!r} (keys: {sorted(record)})") from None
    if value is None:
        raise ValueError(f"record field {name!r} is empty (None)")
    return str(value)


def _model_error(path: str, what: str, err: Exception) -> InputError:
    return InputError(f"student.model {path!r} cannot be loaded as {what}: {err}")


class Student(ABC):
    """A trainable, scorable, savable student for one task.

    Args:
        task: The task the student learns.
        model_path: A local HF folder or hub id with safetensors weights.
        max_length: Tokens per input.
        batch_size: Training batch size (scoring and prediction use twice as much).
        lr: AdamW learning rate (a :meth:`fit` call may override it).
        weight_decay: AdamW weight decay.
        seed: Seeds the head initialisation and, by default, training.
        trust_remote_code: Allow model code from the model folder.
        device: ``cpu``, ``cuda`` …; default: CUDA when available.
        schedule: ``linear`` decay to zero over each :meth:`fit` call, or ``constant``.
        precision: What training computes in: ``auto`` (bfloat16 where the device does it fast),
            ``bfloat16`` or ``float32`` (see :func:`gold_ray.devices.training_dtype`). Weights and
            optimiser state are float32 either way, and scoring and prediction compute in float32.

    Attributes:
        model: The torch module (``eval`` mode outside :meth:`fit`).
        tokenizer: Its tokenizer.
        kind: ``classifier`` or ``text_to_text``.
        train_dtype: The dtype ``precision`` resolved to on this student's device.
    """

    kind: str = "base"

    def __init__(
        self,
        task: TaskSpec,
        model_path: str | Path,
        *,
        max_length: int = 128,
        batch_size: int = 32,
        lr: float = 5e-5,
        weight_decay: float = 0.01,
        seed: int = 0,
        trust_remote_code: bool = False,
        device: str | None = None,
        schedule: Schedule = "linear",
        precision: str = "auto",
    ):
        self.task = task
        self.model_path = str(model_path)
        # What reset() reloads; load() points it back at the original pretrained model.
        self.base_model_path = self.model_path
        self.max_length = max_length
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.seed = seed
        self.trust_remote_code = allow_remote_code(trust_remote_code, self.model_path, "student")
        self.schedule = schedule
        self.device = torch.device(device or default_device())
        self.precision = precision
        self.train_dtype = training_dtype(precision, self.device.type)
        self.tokenizer = self._load_tokenizer(self.model_path)
        with _seeded(seed):
            self.model: nn.Module = self._load_model(self.model_path).to(self.device)
        self.model.eval()

    # ----- loading -------------------------------------------------------------------------

    def _load_tokenizer(self, path: str) -> Any:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError, KeyError) as err:
            raise _model_error(path, "a tokenizer", err) from err
        if tok.pad_token is None:
            # Decoder-only tokenizers often lack a pad token; padding is always masked anyway.
            tok.pad_token = tok.eos_token or tok.unk_token
        if tok.pad_token is None:
            raise InputError(f"student.model {path!r}: the tokenizer has no pad, eos or unk token to pad with")
        return tok

    @abstractmethod
    def _load_model(self, path: str) -> nn.Module:
        """The HF model at ``path`` (called inside a seeded RNG block)."""

    def _fresh_head(self, model: nn.Module) -> None:  # noqa: B027 - optional hook, no-op by default
        """Re-initialise task-specific output layers after :meth:`reset` reloaded the weights."""

    def reset(self) -> None:
        """Re-initialise to the pretrained weights with a fresh head (GOLD's fresh final student).

        Reloads ``base_model_path`` (the model the student was first built from); when that is
        gone, reloads the student's own folder and re-draws its head.
        """
        for source in dict.fromkeys([self.base_model_path, self.model_path]):
            try:
                with _seeded(self.seed):
                    model = self._load_model(source)
                    self._fresh_head(model)
            except ValueError:
                continue
            self.model = model.to(self.device)
            self.model.eval()
            return
        raise InputError(f"student.model: neither {self.base_model_path!r} nor {self.model_path!r} loads")

    # ----- batches and loss (also used by the Ray Train loop) --------------------------------

    @abstractmethod
    def collate(self, records: Sequence[dict]) -> dict[str, Tensor]:
        """A tokenised batch on CPU, with ``labels`` when every record has its target.

        Args:
            records: Records with the task's input fields (and target key).

        Returns:
            Model inputs plus ``labels``.
        """

    @abstractmethod
    def batch_loss(
        self, model: nn.Module, batch: dict[str, Tensor], loss: str = "ce", alpha: float = 1.0, beta: float = 1.0
    ) -> Tensor:
        """The training loss of one :meth:`collate` batch under ``model``.

        Args:
            model: :attr:`model` or a wrapped copy of it (DDP); the batch is moved to its device.
            batch: Output of :meth:`collate`, with labels.
            loss: ``ce`` or ``sce``.
            alpha: SCE weight of CE.
            beta: SCE weight of reverse CE.

        Returns:
            A scalar loss with a graph.
        """

    @staticmethod
    def _to_device(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        device = next(model.parameters()).device
        return {k: v.to(device) for k, v in batch.items()}

    # ----- training ------------------------------------------------------------------------

    def fit(
        self,
        records: Sequence[dict],
        epochs: int,
        *,
        loss: str = "ce",
        alpha: float = 1.0,
        beta: float = 1.0,
        lr: float | None = None,
        seed: int = 0,
        on_step: Callable[[dict], None] | None = None,
        recipe: Recipe | None = None,
        val_records: Sequence[dict] = (),
    ) -> dict:
        """Train on ``records`` (continues from the current weights) with :func:`gold_ray.student.training.fit`.

        Args:
            records: Training records with the target key.
            epochs: Passes over ``records`` (ignored when ``recipe`` is given).
            loss: ``ce`` or ``sce`` (see :mod:`gold_ray.student.losses`; ignored with ``recipe``).
            alpha: SCE weight of CE.
            beta: SCE weight of reverse CE.
            lr: Learning rate for this call; default: the student's ``lr``.
            seed: Seeds the batch order and dropout.
            on_step: Called after every optimiser step with ``epoch``, ``step``, ``loss``, ``lr``.
            recipe: The whole recipe (budget floor, warm-up, early stopping); default: exactly
                ``epochs`` epochs of ``loss`` at ``lr`` under the student's schedule.
            val_records: Synthetic validation records (early stopping, best epoch).

        Returns:
            See :func:`gold_ray.student.training.fit`: ``loss`` (mean of the last epoch, NaN when there
            was nothing to train on), ``steps``, ``epochs``, ``seconds`` ….
        """
        if recipe is None:
            recipe = Recipe(loss=loss, alpha=alpha, beta=beta, lr=lr if lr is not None else self.lr,
                            epochs=epochs, max_epochs=epochs, schedule=self.schedule)
        return training.fit(self, records, recipe, seed=seed, val_records=val_records, on_step=on_step)

    # ----- inference -----------------------------------------------------------------------

    @property
    def eval_batch_size(self) -> int:
        """Rows per batch when scoring or predicting."""
        return 2 * self.batch_size

    @abstractmethod
    def logits(self, records: Sequence[dict]) -> np.ndarray:
        """Raw output scores (see the subclass for the shape)."""

    def ood_scores(
        self,
        records: Sequence[dict],
        *,
        score: str = "energy",
        temperature: float = 1.0,
        mode: str = "masked",
    ) -> np.ndarray:
        """One OOD score per record, higher = more out-of-distribution.

        Args:
            records: Records (with the target for ``nll`` and for text-to-text students).
            score: ``energy``, ``msp`` or ``nll`` from the model, or ``random``: the ablation
                control :func:`gold_ray.student.ood.hashed_uniform_scores` of the input fields, which
                runs no model.
            temperature: Energy temperature.
            mode: Text-to-text energy over ``masked`` real target tokens or ``code_faithful``
                (every position up to ``max_target_length``, pads included).

        Returns:
            ``float64`` array of length ``len(records)``.
        """
        if score == "random":
            return ood.hashed_uniform_scores([_inputs_only(r, self.task) for r in records])
        return self._model_ood_scores(records, score=score, temperature=temperature, mode=mode)

    @abstractmethod
    def _model_ood_scores(
        self, records: Sequence[dict], *, score: str, temperature: float, mode: str
    ) -> np.ndarray:
        """The model-based scores of :meth:`ood_scores` (``energy``, ``msp``, ``nll``)."""

    @abstractmethod
    def predict(self, records: Sequence[dict]) -> list[str]:
        """Label names (classifier) or generated target strings (text-to-text), one per record."""

    # ----- persistence ---------------------------------------------------------------------

    def _meta(self) -> dict:
        return {
            "kind": self.kind,
            "task": self.task.name,
            "labels": self.task.label_names,
            "target_key": self.task.target_key,
            "base_model": self.base_model_path,
            "settings": {name: getattr(self, name) for name in self._settings()},
        }

    @classmethod
    def _settings(cls) -> tuple[str, ...]:
        return _SETTINGS

    def save(self, out_dir: str | Path) -> None:
        """Write the model and tokenizer in HF format (safetensors) and ``gold_ray_student.json``.

        Args:
            out_dir: Folder to write (created if missing).
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        (out / META_FILE).write_text(json.dumps(self._meta(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, out_dir: str | Path, task: TaskSpec, **overrides: Any) -> Student:
        """Load a student written by :meth:`save`.

        Args:
            out_dir: The folder :meth:`save` wrote.
            task: The task; its labels (or target field) must match the saved student's.
            **overrides: Constructor arguments replacing the saved settings (``device`` …).

        Returns:
            The student, of the saved kind.

        Raises:
            ValueError: no or a malformed ``gold_ray_student.json``, another kind, or a task
                whose labels or target differ.
        """
        meta = read_student_meta(out_dir)
        target_cls = _KINDS.get(meta.get("kind", ""))
        if target_cls is None:
            raise InputError(f"{Path(out_dir) / META_FILE}: unknown student kind {meta.get('kind')!r}")
        if cls is not Student and not issubclass(target_cls, cls):
            raise InputError(f"{out_dir}: holds a {meta['kind']} student, not a {cls.kind} student")
        if task.is_classification and meta.get("labels") != task.label_names:
            raise InputError(
                f"{out_dir}: student labels {meta.get('labels')} differ from task {task.name!r} labels {task.label_names}"
            )
        if meta.get("target_key") not in (None, task.target_key):
            raise InputError(f"{out_dir}: student target {meta['target_key']!r} is not task target {task.target_key!r}")
        settings = {k: v for k, v in dict(meta.get("settings", {})).items() if k in target_cls._settings()}
        settings.update(overrides)
        student = target_cls(task, out_dir, **settings)
        student.base_model_path = str(meta.get("base_model") or out_dir)
        return student


def read_student_meta(out_dir: str | Path) -> dict:
    """The ``gold_ray_student.json`` of a saved student.

    Raises:
        ValueError: the file is missing or not a JSON object.
    """
    path = Path(out_dir) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{out_dir}: not a saved gold-ray student (no {META_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise InputError(f"{path}: expected a JSON object")
    return meta


class ClassifierStudent(Student):
    """A sequence classifier over ``task.label_names``.

    Pair tasks are tokenised as a pair ``(text_a, text_b)``; a task with more than two input
    fields is joined into one text of ``"{display}: {value}"`` lines. The saved config carries
    ``id2label``/``label2id``, so ``AutoModelForSequenceClassification.from_pretrained(out_dir)``
    gives a usable classifier.

    Args:
        task: A classification or pair-classification task.
        model_path: A local folder or hub id; a head of the right size is added when missing.
        **kwargs: See :class:`Student`.
    """

    kind = "classifier"

    def __init__(self, task: TaskSpec, model_path: str | Path, **kwargs: Any):
        if not task.is_classification:
            raise ValueError(f"task {task.name!r} is {task.type}: a classifier student needs a label set")
        self.label2id = {name: i for i, name in enumerate(task.label_names)}
        super().__init__(task, model_path, **kwargs)

    def _load_model(self, path: str) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        names = self.task.label_names
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=len(names),
                id2label=dict(enumerate(names)),
                label2id=dict(self.label2id),
                # A head trained for another label set is replaced, not an error.
                ignore_mismatched_sizes=True,
                use_safetensors=True,
                trust_remote_code=self.trust_remote_code,
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise _model_error(path, "a sequence classifier", err) from err
        if model.config.pad_token_id is None:
            # Decoder classifiers find the last real token through the pad id.
            model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def _fresh_head(self, model: nn.Module) -> None:
        backbone = getattr(model, "base_model", model)
        if backbone is model:
            return
        inside = {id(m) for m in backbone.modules()}
        std = float(getattr(model.config, "initializer_range", 0.02))
        for module in model.modules():
            if id(module) in inside or any(True for _ in module.children()):
                continue
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def _texts(self, records: Sequence[dict]) -> tuple[list[str], list[str] | None]:
        fields = self.task.input_fields
        if len(fields) == 1:
            return [_field(r, fields[0].name) for r in records], None
        if len(fields) == 2:
            return [_field(r, fields[0].name) for r in records], [_field(r, fields[1].name) for r in records]
        joined = ["\n".join(f"{f.display}: {_field(r, f.name)}" for f in fields) for r in records]
        return joined, None

    def collate(self, records: Sequence[dict]) -> dict[str, Tensor]:
        """Tokenised inputs (as a pair for pair tasks) and ``labels`` (label ids) when present.

        Args:
            records: Records with the input fields and, for training, ``label``.

        Returns:
            ``input_ids``, ``attention_mask`` (and whatever else the tokenizer gives) plus ``labels``.

        Raises:
            ValueError: a missing field or a label outside the task's label set.
        """
        first, second = self._texts(records)
        enc = self.tokenizer(
            first, second, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt"
        )
        batch = dict(enc)
        if records and all(r.get("label") is not None for r in records):
            ids = []
            for r in records:
                if r["label"] not in self.label2id:
                    raise ValueError(f"label {r['label']!r} is not one of task {self.task.name!r} labels {self.task.label_names}")
                ids.append(self.label2id[r["label"]])
            batch["labels"] = torch.tensor(ids, dtype=torch.long)
        return batch

    def batch_loss(
        self, model: nn.Module, batch: dict[str, Tensor], loss: str = "ce", alpha: float = 1.0, beta: float = 1.0
    ) -> Tensor:
        """Class-logit CE or SCE of one batch; see :meth:`Student.batch_loss`."""
        inputs = self._to_device(model, batch)
        labels = inputs.pop("labels")
        # The loss in float32 whatever the forward computed in (bf16 training): softmax of bf16 logits is coarse.
        return loss_fn(loss, alpha, beta)(model(**inputs).logits.float(), labels)

    @torch.no_grad()
    def logits(self, records: Sequence[dict]) -> np.ndarray:
        """Class logits ``[N, K]`` (float32) in ``task.label_names`` order."""
        self.model.eval()
        out = [np.zeros((0, len(self.label2id)), dtype=np.float32)]
        for chunk in _chunks(records, self.eval_batch_size):
            inputs = self._to_device(self.model, self.collate(chunk))
            inputs.pop("labels", None)
            out.append(self.model(**inputs).logits.float().cpu().numpy())
        return np.concatenate(out)

    def _model_ood_scores(
        self, records: Sequence[dict], *, score: str, temperature: float, mode: str
    ) -> np.ndarray:
        """Class-logit OOD scores; ``mode`` does not apply to a classifier. See :meth:`Student.ood_scores`."""
        logits = self.logits(records)
        if score == "energy":
            values = ood.energy_from_logits(logits, temperature=temperature)
        elif score == "msp":
            values = ood.msp_score(logits)
        elif score == "nll":
            labels = np.array([self.label2id[_field(r, "label")] for r in records], dtype=np.int64)
            values = ood.nll_score(logits, labels)
        else:
            raise ValueError(f"unknown OOD score {score!r}: expected energy, msp, nll or random")
        return np.asarray(values, dtype=np.float64).reshape(len(records))

    def predict(self, records: Sequence[dict]) -> list[str]:
        """The arg-max label name of each record."""
        names = self.task.label_names
        return [names[i] for i in self.logits(records).argmax(axis=-1)]


class TextToTextStudent(Student):
    """A seq2seq or causal LM that writes the target string.

    Seq2seq models (``config.is_encoder_decoder``) read the field lines and are trained on the
    target tokens plus EOS. Causal LMs read ``[bos] field lines \\n{target_display}:`` followed by
    `` {target}`` and EOS; the prompt tokens are masked to -100 so that only the target is learned.
    Prediction is greedy decoding of at most ``max_target_length`` tokens. For a classification
    task the target is the label's verbalizer and predictions are mapped back to label names.

    Args:
        task: Any task.
        model_path: A local folder or hub id of a seq2seq or causal LM.
        max_target_length: Target tokens (EOS included) for training, scoring and generation.
        **kwargs: See :class:`Student`.
    """

    kind = "text_to_text"

    def __init__(self, task: TaskSpec, model_path: str | Path, *, max_target_length: int = 32, **kwargs: Any):
        self.max_target_length = max_target_length
        self.is_seq2seq = False
        super().__init__(task, model_path, **kwargs)
        tok = self.tokenizer
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        if eos is None:
            raise InputError(f"student.model {self.model_path!r}: the tokenizer has no eos (or sep) token")
        self.eos_id = int(eos)
        self.pad_id = int(tok.pad_token_id)

    @classmethod
    def _settings(cls) -> tuple[str, ...]:
        return (*_SETTINGS, "max_target_length")

    def _load_model(self, path: str) -> nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=self.trust_remote_code)
            self.is_seq2seq = bool(getattr(config, "is_encoder_decoder", False))
            auto = AutoModelForSeq2SeqLM if self.is_seq2seq else AutoModelForCausalLM
            model = auto.from_pretrained(path, use_safetensors=True, trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise _model_error(path, "a seq2seq or causal LM", err) from err
        if self.is_seq2seq and model.config.decoder_start_token_id is None:
            model.config.decoder_start_token_id = self.tokenizer.pad_token_id
        return model

    # ----- encoding ------------------------------------------------------------------------

    def _source(self, record: dict) -> str:
        return "\n".join(f"{f.display}: {_field(record, f.name)}" for f in self.task.input_fields)

    def _target_text(self, record: dict) -> str | None:
        value = record.get(self.task.target_key)
        if value is None:
            return None
        if self.task.is_classification:
            return self.task.label(str(value)).word
        return str(value)

    def _target_ids(self, text: str) -> list[int]:
        # A leading space makes the target a fresh word after "Answer:" for BPE tokenizers.
        ids = self.tokenizer(text if self.is_seq2seq else " " + text, add_special_tokens=False)["input_ids"]
        return list(ids[: self.max_target_length - 1]) + [self.eos_id]

    def _prompt_ids(self, record: dict) -> list[int]:
        suffix = self.tokenizer(f"\n{self.task.target_display}:", add_special_tokens=False)["input_ids"]
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        room = max(1, self.max_length - len(suffix) - len(bos))
        body = self.tokenizer(self._source(record), add_special_tokens=False, truncation=True, max_length=room)
        return bos + list(body["input_ids"]) + list(suffix)

    def _pad(self, rows: list[list[int]], value: int, length: int | None = None, left: bool = False) -> Tensor:
        width = max(length or 0, max((len(r) for r in rows), default=0))
        out = [([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r))) for r in rows]
        return torch.tensor(out, dtype=torch.long)

    def _encode(self, records: Sequence[dict], target_len: int | None = None) -> tuple[dict[str, Tensor], list[int]]:
        """The batch and, for causal LMs, each row's prompt length (0 for seq2seq)."""
        targets = [self._target_text(r) for r in records]
        with_targets = bool(records) and all(t is not None for t in targets)
        target_ids = [self._target_ids(t) for t in targets] if with_targets else []
        if self.is_seq2seq:
            enc = self.tokenizer(
                [self._source(r) for r in records],
                truncation=True,
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            )
            batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
            if with_targets:
                batch["labels"] = self._pad(target_ids, -100, target_len)
            return batch, [0] * len(records)
        prompts = [self._prompt_ids(r) for r in records]
        if not with_targets:
            target_ids = [[] for _ in records]
        rows = [p + t for p, t in zip(prompts, target_ids, strict=True)]
        width = max(len(p) for p in prompts) + (target_len or 0)
        batch = {
            "input_ids": self._pad(rows, self.pad_id, width),
            "attention_mask": self._pad([[1] * len(r) for r in rows], 0, width),
        }
        if with_targets:
            labels = [[-100] * len(p) + t for p, t in zip(prompts, target_ids, strict=True)]
            batch["labels"] = self._pad(labels, -100, width)
        return batch, [len(p) for p in prompts]

    def collate(self, records: Sequence[dict]) -> dict[str, Tensor]:
        """Tokenised inputs and ``labels`` (target ids, prompt and padding at -100).

        Args:
            records: Records with the input fields and, for training, the target.

        Returns:
            ``input_ids``, ``attention_mask`` and ``labels``.
        """
        return self._encode(records)[0]

    def _shifted(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self.is_seq2seq:
            return logits, labels
        # A causal LM predicts token t+1 at position t.
        return logits[:, :-1], labels[:, 1:]

    def batch_loss(
        self, model: nn.Module, batch: dict[str, Tensor], loss: str = "ce", alpha: float = 1.0, beta: float = 1.0
    ) -> Tensor:
        """Token-level CE or SCE over the target tokens; see :meth:`Student.batch_loss`."""
        inputs = self._to_device(model, batch)
        labels = inputs["labels"]
        if not self.is_seq2seq:
            inputs.pop("labels")
        logits, targets = self._shifted(model(**inputs).logits.float(), labels)
        return loss_fn(loss, alpha, beta)(logits, targets)

    def _target_logits(self, records: Sequence[dict], fixed: bool) -> tuple[Tensor, Tensor]:
        """Teacher-forced logits at the target positions ``[n, T, V]`` and the aligned labels ``[n, T]``.

        ``fixed`` pads the targets to ``max_target_length`` (the GOLD code's layout).
        """
        target_len = self.max_target_length if fixed else None
        batch, prompt_lens = self._encode(records, target_len)
        if "labels" not in batch:
            raise ValueError(f"scoring a text-to-text student needs the target {self.task.target_key!r} in every record")
        inputs = self._to_device(self.model, batch)
        labels = inputs["labels"]
        if self.is_seq2seq:
            return self.model(**inputs).logits.float(), labels
        inputs.pop("labels")
        logits = self.model(**inputs).logits.float()
        width = target_len or max(int((labels[i] != -100).sum()) for i in range(len(records)))
        offsets = torch.arange(width, device=logits.device)
        index = torch.tensor(prompt_lens, device=logits.device)[:, None] + offsets  # target token positions
        index = index.clamp(max=labels.shape[1] - 1)
        gathered = logits.gather(1, (index - 1)[..., None].expand(-1, -1, logits.shape[-1]))
        target = labels.gather(1, index)
        # Positions past the end of a row's target are padding.
        target = target.masked_fill(offsets[None] >= (labels != -100).sum(1, keepdim=True), -100)
        return gathered, target

    @torch.no_grad()
    def logits(self, records: Sequence[dict]) -> np.ndarray:
        """Teacher-forced target logits ``[N, max_target_length, V]`` (float32; needs targets)."""
        self.model.eval()
        out = []
        for chunk in _chunks(records, self.eval_batch_size):
            logits, _ = self._target_logits(chunk, fixed=True)
            out.append(logits.cpu().numpy())
        if not out:
            return np.zeros((0, self.max_target_length, 0), dtype=np.float32)
        return np.concatenate(out)

    @torch.no_grad()
    def _model_ood_scores(
        self, records: Sequence[dict], *, score: str, temperature: float, mode: str
    ) -> np.ndarray:
        """Token-level OOD scores under teacher forcing; see :meth:`Student.ood_scores`.

        ``energy`` is :func:`gold_ray.student.ood.token_energy` and ``nll`` :func:`gold_ray.student.ood.token_nll`
        over the target positions. Energy in ``masked`` mode averages the real target tokens (EOS
        included), in ``code_faithful`` mode every position up to ``max_target_length``; NLL
        always averages the real target tokens.
        """
        if score not in ("energy", "nll"):
            raise ValueError(f"unknown OOD score {score!r} for a text-to-text student: expected energy, nll or random")
        if mode not in ("masked", "code_faithful"):
            raise ValueError(f"unknown energy mode {mode!r}: expected masked or code_faithful")
        self.model.eval()
        out = [np.zeros(0, dtype=np.float64)]
        for chunk in _chunks(records, self.eval_batch_size):
            logits, labels = self._target_logits(chunk, fixed=mode == "code_faithful")
            mask = labels != -100
            if score == "energy":
                values = ood.token_energy(logits, mask, temperature=temperature, mode=mode)
            else:
                values = ood.token_nll(logits, labels.masked_fill(~mask, 0), mask)
            out.append(np.asarray(_numpy(values), dtype=np.float64).reshape(len(chunk)))
        return np.concatenate(out)

    @torch.no_grad()
    def generate(self, records: Sequence[dict]) -> list[str]:
        """Greedy generations (the raw target strings), one per record."""
        self.model.eval()
        texts: list[str] = []
        for chunk in _chunks(records, self.eval_batch_size):
            options = {
                "max_new_tokens": self.max_target_length,
                "do_sample": False,
                "num_beams": 1,
                "eos_token_id": self.eos_id,
                "pad_token_id": self.pad_id,
            }
            if self.is_seq2seq:
                batch = self._to_device(self.model, self._encode([_inputs_only(r, self.task) for r in chunk])[0])
                new = self.model.generate(**batch, **options)
            else:
                prompts = [self._prompt_ids(r) for r in chunk]
                ids = self._pad(prompts, self.pad_id, left=True).to(self.device)
                mask = self._pad([[1] * len(p) for p in prompts], 0, left=True).to(self.device)
                new = self.model.generate(input_ids=ids, attention_mask=mask, **options)[:, ids.shape[1] :]
            texts.extend(s.strip() for s in self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return texts

    def predict(self, records: Sequence[dict]) -> list[str]:
        """Generated target strings; for a classification task, the label whose verbalizer was written."""
        texts = self.generate(records)
        if not self.task.is_classification:
            return texts
        by_word = {label.word.lower(): label.name for label in self.task.labels}
        return [by_word.get(t.lower(), t) for t in texts]


def _inputs_only(record: dict, task: TaskSpec) -> dict:
    return {name: record.get(name) for name in task.field_names}


def _numpy(values: Any) -> np.ndarray:
    if isinstance(values, Tensor):
        return values.detach().float().cpu().numpy()
    return np.asarray(values)


_KINDS: dict[str, type[Student]] = {"classifier": ClassifierStudent, "text_to_text": TextToTextStudent}


def load_student(out_dir: str | Path, task: TaskSpec, **overrides: Any) -> Student:
    """Load a saved student of any kind (dispatching on ``gold_ray_student.json``).

    Args:
        out_dir: The folder :meth:`Student.save` wrote.
        task: The task it was trained for.
        **overrides: Constructor arguments replacing the saved settings.

    Returns:
        A :class:`ClassifierStudent` or :class:`TextToTextStudent`.
    """
    return Student.load(out_dir, task, **overrides)


def build_student(
    task: TaskSpec, cfg: StudentConfig, model_path: str | Path, *, seed: int = 0, device: str | None = None
) -> Student:
    """A fresh student for ``task`` as ``cfg`` describes it.

    Args:
        task: The task.
        cfg: The ``student`` config section; ``kind: auto`` means a classifier for classification
            tasks and a text-to-text student otherwise.
        model_path: ``cfg.model`` already resolved to a local folder or hub id.
        seed: Seeds head initialisation and training (the run seed).
        device: Torch device; default CUDA when available.

    Returns:
        The student.

    Raises:
        ValueError: the kind does not fit the task, or the model cannot be that kind of student
            (the message names ``student.model``).
    """
    kind = cfg.kind
    if kind == "auto":
        kind = "classifier" if task.is_classification else "text_to_text"
    common = {
        "max_length": cfg.max_length,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "seed": seed,
        "trust_remote_code": cfg.trust_remote_code,
        "device": device,
        "precision": cfg.precision,
    }
    if kind == "classifier":
        if not task.is_classification:
            raise InputError(f"student.kind: a classifier cannot learn the {task.type} task {task.name!r}")
        return ClassifierStudent(task, model_path, **common)
    return TextToTextStudent(task, model_path, max_target_length=cfg.max_target_length, **common)


def check_student_model(task: TaskSpec, cfg: StudentConfig, model_path: str | Path) -> None:
    """Check, from the model's config alone, that it can be the student ``cfg`` asks for.

    Cheap (reads ``config.json``, loads no weights), so a run can refuse a wrong student before
    the teacher spends anything.

    Args:
        task: The task.
        cfg: The ``student`` config section.
        model_path: ``cfg.model`` resolved to a local folder or hub id.

    Raises:
        ValueError: the kind does not fit the task, the config does not load, or the model's
            architecture has no head of the needed kind (the message names ``student.model``).
    """
    from transformers import AutoConfig
    from transformers.models.auto import modeling_auto

    kind = cfg.kind if cfg.kind != "auto" else ("classifier" if task.is_classification else "text_to_text")
    if kind == "classifier" and not task.is_classification:
        raise InputError(f"student.kind: a classifier cannot learn the {task.type} task {task.name!r}")
    trust = allow_remote_code(cfg.trust_remote_code, str(model_path), "student")
    try:
        config = AutoConfig.from_pretrained(str(model_path), trust_remote_code=trust)
    except (OSError, ValueError, KeyError) as err:
        raise _model_error(str(model_path), "a student", err) from err
    if kind == "classifier":
        needed = {"AutoModelForSequenceClassification": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING}
        what = "a sequence classifier"
    else:
        needed = {"AutoModelForSeq2SeqLM": modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING,
                  "AutoModelForCausalLM": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING}
        what = "a seq2seq or causal LM"
    remote = getattr(config, "auto_map", None) or {}
    # transformers gives BERT-like encoders a causal-LM class too, but one never trained to write:
    # an encoder (a masked LM not configured as a decoder) is no text-to-text student.
    encoder = (kind == "text_to_text" and type(config) in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING
               and type(config) not in modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING
               and not getattr(config, "is_decoder", False))
    if not encoder and any(type(config) in mapping or (trust and auto in remote) for auto, mapping in needed.items()):
        return
    hint = ("; pick a text encoder such as embedded:all-minilm-l6-v2" if kind == "classifier" else
            "; set student.model to one, e.g. embedded:smollm2-135m-instruct or a Hub id such as "
            "google/flan-t5-small" + (f" ({config.model_type!r} is an encoder)" if encoder else ""))
    raise InputError(
        f"student.model {cfg.model!r}: a {config.model_type!r} model cannot be {what}, which the "
        f"{task.type} task {task.name!r} needs (student.kind={cfg.kind}){hint}"
    )
