"""Out-of-distribution scores of generated samples under the student, and the selections built on them.

Every score here has the same orientation: **higher means more OOD**. The energy of Liu et al.
(2020), used by GOLD (methods.md 2.4), is ``E(x) = -T * logsumexp(f(x) / T)``: a confident,
in-distribution sample has a large top logit and therefore a low energy.

Scores are returned as float64 numpy arrays. A row whose logits hold NaN or inf gets a NaN score;
:func:`band_indices`, :func:`noise_filter_mask` and :func:`score_quantiles` leave NaN rows out, so a
broken row is never selected as feedback and never skews a metric.

The GOLD feedback band (methods.md 2.3) sorts a probe batch by energy and keeps ranks
``floor(0.5 * B) .. floor(0.8 * B) - 1``: the bottom half is in-distribution (nothing new) and the
top fifth is treated as noise. With B = 8 that is ranks 4 and 5.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor
EnergyMode = Literal["masked", "code_faithful"]

QUANTILES: tuple[tuple[str, float], ...] = (("p10", 10), ("p25", 25), ("p50", 50), ("p75", 75), ("p90", 90))
"""Metric names and percentiles reported by :func:`score_quantiles` (next to ``mean``)."""


def _as_float64(x: ArrayLike) -> np.ndarray:
    """A float64 numpy copy of a numpy array or a torch tensor (any dtype, any device)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _check_temperature(temperature: float) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """logsumexp over the last axis; rows with any non-finite entry give NaN."""
    finite = np.isfinite(x).all(axis=-1)
    # Zero the broken rows before the arithmetic so numpy never warns about inf - inf.
    safe = np.where(finite[..., None], x, 0.0)
    if safe.shape[-1] == 0:
        return np.full(safe.shape[:-1], np.nan)
    top = safe.max(axis=-1, keepdims=True)
    out = top[..., 0] + np.log(np.exp(safe - top).sum(axis=-1))
    return np.where(finite, out, np.nan)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    """log-softmax over the last axis; rows with any non-finite entry become all-NaN."""
    return x - _logsumexp(x)[..., None]


def _check_class_logits(logits: np.ndarray) -> None:
    if logits.ndim != 2:
        raise ValueError(f"expected class logits of shape [N, K], got shape {logits.shape}")


def energy_from_logits(logits: ArrayLike, temperature: float = 1.0) -> np.ndarray:
    """Energy of each row of class logits: ``E = -T * logsumexp(logits / T)``.

    Lower energy means more in-distribution: the larger the top logit, the lower the energy.

    Args:
        logits: Class logits of shape ``[N, K]`` (numpy or torch, any float dtype).
        temperature: The energy temperature T (> 0); GOLD uses 1.

    Returns:
        float64 array of shape ``[N]``; NaN for rows that contain NaN or inf.

    Raises:
        ValueError: ``logits`` is not 2-D or ``temperature`` is not positive.
    """
    _check_temperature(temperature)
    x = _as_float64(logits)
    _check_class_logits(x)
    return -temperature * _logsumexp(x / temperature)


def _check_token_shapes(logits: np.ndarray | torch.Tensor, other: np.ndarray, name: str) -> None:
    if logits.ndim != 3 or tuple(other.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"expected token logits [N, L, V] and {name} [N, L], got {tuple(logits.shape)} and {tuple(other.shape)}"
        )


def _position_energy(logits: ArrayLike, temperature: float) -> np.ndarray:
    """Per-position energy ``[N, L]`` (NaN where a position's logits are not finite)."""
    if isinstance(logits, torch.Tensor):
        # Reduce over the vocabulary in torch first: a [N, L, 32k] float64 numpy copy is wasteful.
        z = logits.detach().to(torch.float64) / temperature
        finite = torch.isfinite(z).all(dim=-1)
        lse = torch.logsumexp(
            torch.where(finite[..., None], z, torch.zeros((), dtype=z.dtype, device=z.device)), -1
        )
        lse = torch.where(finite, lse, torch.full_like(lse, float("nan")))
        return -temperature * lse.cpu().numpy()
    return -temperature * _logsumexp(_as_float64(logits) / temperature)


def token_energy(
    logits: ArrayLike,
    mask: ArrayLike,
    temperature: float = 1.0,
    mode: EnergyMode = "masked",
) -> np.ndarray:
    """Sequence energy of a text-to-text student: per-position energy averaged over positions.

    At each decoder position t (teacher forcing on the target) the energy is
    ``e_t = -T * logsumexp_v(z_{t,v} / T)`` over the whole vocabulary. The two modes differ only
    in which positions are averaged:

    - ``masked`` (default, the clean reading of the paper): the mean over the real target tokens
      (``mask == 1``). A row without any real token gives NaN.
    - ``code_faithful`` (what the GOLD code does, methods.md 2.4): the mean over all ``L``
      positions, padding included, so for one-word targets the pad positions dominate the score.

    Without padding (``mask`` all ones) both modes agree.

    Args:
        logits: Decoder logits of shape ``[N, L, V]``.
        mask: ``[N, L]``, 1 (or True) for a real target token, 0 for padding.
        temperature: The energy temperature T (> 0).
        mode: ``masked`` or ``code_faithful``.

    Returns:
        float64 array ``[N]``; NaN where a counted position has non-finite logits.

    Raises:
        ValueError: on mismatched shapes, an unknown mode or a non-positive temperature.
    """
    _check_temperature(temperature)
    if mode not in ("masked", "code_faithful"):
        raise ValueError(f"mode must be 'masked' or 'code_faithful', got {mode!r}")
    m = _as_float64(mask)
    _check_token_shapes(logits, m, "mask")
    per_pos = _position_energy(logits, temperature)
    if mode == "code_faithful":
        return per_pos.mean(axis=-1) if per_pos.shape[-1] else np.full(per_pos.shape[0], np.nan)
    return _masked_mean(per_pos, m > 0)


def _masked_mean(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Row means of ``values`` over ``keep``; NaN where nothing is kept or a kept value is NaN."""
    # np.where keeps NaN from uncounted (padding) positions out of the sum.
    total = np.where(keep, values, 0.0).sum(axis=-1)
    count = keep.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def msp_score(logits: ArrayLike) -> np.ndarray:
    """Negative maximum softmax probability (Hendrycks & Gimpel 2017): higher means more OOD.

    Args:
        logits: Class logits ``[N, K]``.

    Returns:
        float64 array ``[N]`` in ``[-1, -1/K]``; NaN for rows with non-finite logits.
    """
    x = _as_float64(logits)
    _check_class_logits(x)
    return -np.exp(_log_softmax(x)).max(axis=-1) if x.shape[-1] else np.full(len(x), np.nan)


def _check_ids(ids: np.ndarray, n_classes: int, keep: np.ndarray | None = None) -> np.ndarray:
    """Integer ids, checked to lie in ``[0, n_classes)`` where ``keep`` is set; others become 0."""
    ids = np.asarray(ids)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    counted = ids if keep is None else ids[keep]
    if counted.size and (counted.min() < 0 or counted.max() >= n_classes):
        raise ValueError(f"ids must lie in [0, {n_classes}), got range [{counted.min()}, {counted.max()}]")
    return ids if keep is None else np.where(keep, ids, 0)


def nll_score(logits: ArrayLike, labels: ArrayLike) -> np.ndarray:
    """Negative log-likelihood of the asked-for label under the student (higher = more surprising).

    Args:
        logits: Class logits ``[N, K]``.
        labels: Integer label indices ``[N]``.

    Returns:
        float64 array ``[N]``; NaN for rows with non-finite logits.

    Raises:
        ValueError: shapes do not match or a label is out of range.
    """
    x = _as_float64(logits)
    _check_class_logits(x)
    y = _check_ids(_as_int(labels), x.shape[-1])
    if y.shape != (x.shape[0],):
        raise ValueError(f"expected labels of shape [{x.shape[0]}], got {y.shape}")
    return -np.take_along_axis(_log_softmax(x), y[:, None], axis=-1)[:, 0]


def _as_int(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def token_nll(logits: ArrayLike, target_ids: ArrayLike, mask: ArrayLike) -> np.ndarray:
    """Mean token negative log-likelihood of the target sequence, over the real target tokens.

    Positions with ``mask == 0`` are ignored, whatever their id (``-100`` or the pad id).

    Args:
        logits: Decoder logits ``[N, L, V]`` under teacher forcing on the target.
        target_ids: Target token ids ``[N, L]``.
        mask: ``[N, L]``, 1 for a real target token.

    Returns:
        float64 array ``[N]``; NaN for a row without real tokens or with non-finite counted logits.

    Raises:
        ValueError: shapes do not match or a counted id is outside the vocabulary.
    """
    keep = _as_float64(mask) > 0
    _check_token_shapes(logits, keep, "mask")
    ids = _as_int(target_ids)
    _check_token_shapes(logits, ids, "target_ids")
    ids = _check_ids(ids, int(logits.shape[-1]), keep)
    if isinstance(logits, torch.Tensor):
        z = logits.detach().to(torch.float64)
        finite = torch.isfinite(z).all(dim=-1)
        z = torch.where(finite[..., None], z, torch.zeros((), dtype=z.dtype, device=z.device))
        logp = torch.log_softmax(z, -1).gather(-1, torch.as_tensor(ids, device=z.device)[..., None])[..., 0]
        nll = torch.where(finite, -logp, torch.full_like(logp, float("nan"))).cpu().numpy()
    else:
        nll = -np.take_along_axis(_log_softmax(_as_float64(logits)), ids[..., None], axis=-1)[..., 0]
    return _masked_mean(nll, keep)


def _round_count(x: float) -> int:
    """``floor(x)``, after rounding away float noise (``0.29 * 100`` is 28.999999999999996)."""
    return math.floor(round(x, 9))


def _finite_order(scores: ArrayLike) -> np.ndarray:
    """Indices of the finite scores, ascending by score, ties broken by index."""
    s = _as_float64(scores).reshape(-1)
    finite = np.flatnonzero(np.isfinite(s))
    # A stable sort over indices that are already ascending breaks ties by index.
    return finite[np.argsort(s[finite], kind="stable")]


def hashed_uniform_scores(inputs: Sequence[dict[str, Any]]) -> np.ndarray:
    """A fixed number in ``[0, 1)`` per input, from the SHA-256 of its fields: the ``random`` score.

    It is the ablation control for OOD guidance: it knows nothing of the student, so a band taken
    over it picks samples at random, with the same band size as the energy's. Being a function of
    the text alone (labels are not passed in), it is the same in every process, on every scorer
    actor and on every resume, as the model's scores are for a given checkpoint.

    Args:
        inputs: One dict of input fields per sample (JSON-serialisable values).

    Returns:
        float64 array of length ``len(inputs)``.
    """
    values = np.empty(len(inputs), dtype=np.float64)
    for i, fields in enumerate(inputs):
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode()).digest()
        values[i] = int.from_bytes(digest[:8], "big") / 2.0**64
    return values


def band_indices(scores: ArrayLike, lo: float, hi: float) -> np.ndarray:
    """Indices of the samples whose score rank falls in the percentile band ``[lo, hi)``.

    The finite scores are sorted ascending (stable, ties broken by the lower index first) and the
    ranks ``floor(lo * n) .. floor(hi * n) - 1`` are kept, as in the GOLD code: n = 8, lo = 0.5,
    hi = 0.8 keeps ranks 4 and 5. NaN and inf scores are dropped before ranking, so n counts only
    finite scores and a broken row is never selected. Small batches can give an empty band: with
    n = 1, ``floor(0.5) .. floor(0.8) - 1`` is ``0 .. -1``, so nothing is selected.

    Args:
        scores: OOD scores ``[N]`` (higher = more OOD).
        lo: Lower band edge, a fraction in ``[0, 1]``.
        hi: Upper band edge, a fraction in ``(lo, 1]`` (``strategy.band_lo``/``band_hi``: the defaults
            live in the config).

    Returns:
        int64 array of original indices into ``scores``, in rank order (ascending score).

    Raises:
        ValueError: ``lo``/``hi`` are not ``0 <= lo < hi <= 1`` (the config's own check).
    """
    if not (0.0 <= lo < hi <= 1.0):
        raise ValueError(f"band edges must satisfy 0 <= lo < hi <= 1, got lo={lo}, hi={hi}")
    order = _finite_order(scores)
    n = len(order)
    return order[_round_count(lo * n) : _round_count(hi * n)].astype(np.int64)


def noise_filter_mask(scores: ArrayLike, top_fraction: float) -> np.ndarray:
    """Keep-mask that drops the highest-scoring (most OOD, likely noisy) share of the samples.

    The finite scores are ranked as in :func:`band_indices` and ranks ``floor((1 - top_fraction)
    * n)`` and above are dropped, the same rounding as the GOLD band's top edge (n = 8 and
    ``top_fraction = 0.2`` drop 2). NaN and inf rows are always dropped; ``top_fraction = 0``
    keeps every finite row.

    Args:
        scores: OOD scores ``[N]``.
        top_fraction: Share of the finite rows to drop, in ``[0, 1]``.

    Returns:
        bool array ``[N]``, True for the rows to keep.

    Raises:
        ValueError: ``top_fraction`` is outside ``[0, 1]``.
    """
    if not (0.0 <= top_fraction <= 1.0):
        raise ValueError(f"top_fraction must lie in [0, 1], got {top_fraction}")
    s = _as_float64(scores).reshape(-1)
    order = _finite_order(s)
    keep = np.zeros(s.shape[0], dtype=bool)
    keep[order[: _round_count((1.0 - top_fraction) * len(order))]] = True
    return keep


def score_quantiles(scores: ArrayLike) -> dict[str, float]:
    """Summary statistics of the finite scores, for per-iteration metrics.

    Args:
        scores: OOD scores ``[N]``; NaN and inf are ignored.

    Returns:
        ``{"p10", "p25", "p50", "p75", "p90", "mean"}`` as floats, or ``{}`` when no score is finite.
    """
    s = _as_float64(scores).reshape(-1)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return {}
    out = {name: float(np.percentile(s, q)) for name, q in QUANTILES}
    out["mean"] = float(s.mean())
    return out


def score_spread(scores: ArrayLike) -> dict[str, float]:
    """How far apart the finite scores of a stage are: ``score_iqr`` (p75 - p25) and ``score_range``.

    A student whose logits barely depend on its input (one near chance) gives every probe almost
    the same energy; a feedback band cut from such scores is a random pick.

    Returns:
        Both values, or ``{}`` when fewer than two scores are finite.
    """
    s = _as_float64(scores).reshape(-1)
    s = s[np.isfinite(s)]
    if s.size < 2:
        return {}
    return {"score_iqr": float(np.percentile(s, 75) - np.percentile(s, 25)), "score_range": float(s.max() - s.min())}
