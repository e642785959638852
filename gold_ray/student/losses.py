"""Training losses of the student: cross-entropy and GOLD's symmetric cross-entropy (SCE).

Both accept class logits ``[N, K]`` with targets ``[N]`` and token logits ``[N, L, V]`` with
targets ``[N, L]``. Targets equal to ``ignore_index`` are left out of the mean: that is the clean
reading of SCE. The GOLD code instead pads targets with the pad id and averages over every
position, pads included (methods.md 2.5); ``include_padding=True`` with ``pad_token_id`` gives
that behaviour.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Reduction = Literal["mean", "sum", "none"]

Q_FLOOR = 1e-4
"""Lower clamp of the one-hot target distribution in RCE; ``-log(Q_FLOOR)`` is the RCE scale."""

P_FLOOR = 1e-7
"""Lower clamp of the predicted distribution in RCE."""

RCE_SCALE = -math.log(Q_FLOOR)
"""``-log(1e-4) ≈ 9.2103``: RCE equals ``RCE_SCALE * (1 - p_y)`` up to the ``P_FLOOR`` clamp."""

LOSS_NAMES: tuple[str, ...] = ("ce", "sce")
"""Loss names accepted by :func:`loss_fn`."""


def _flat(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    if logits.dim() != targets.dim() + 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match: "
            "expected logits [..., K] and targets [...]"
        )
    return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)


def _valid_targets(
    targets: Tensor, ignore_index: int, include_padding: bool, pad_token_id: int | None
) -> tuple[Tensor, Tensor]:
    """Targets with ignored positions made safe to index, and the mask of counted positions."""
    ignored = targets == ignore_index
    if include_padding:
        if pad_token_id is None:
            raise ValueError("include_padding=True needs pad_token_id: the padded positions predict it")
        return targets.masked_fill(ignored, pad_token_id), torch.ones_like(ignored)
    return targets.masked_fill(ignored, 0), ~ignored


def _reduce(per_pos: Tensor, counted: Tensor, shape: torch.Size, reduction: Reduction) -> Tensor:
    per_pos = per_pos * counted
    if reduction == "none":
        return per_pos.reshape(shape)
    if reduction == "sum":
        return per_pos.sum()
    if reduction == "mean":
        # A batch with nothing to count gives a zero that still carries a graph, not NaN.
        return per_pos.sum() / counted.sum().clamp(min=1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")


def symmetric_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    alpha: float = 1.0,
    beta: float = 1.0,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    *,
    include_padding: bool = False,
    pad_token_id: int | None = None,
) -> Tensor:
    """Symmetric cross-entropy ``alpha * CE + beta * RCE`` (Wang et al. 2019, as GOLD codes it).

    Per position, with ``p = softmax(logits)`` and gold class ``y``: ``CE = -log p_y`` and
    ``RCE = -sum_k clamp(p_k, 1e-7, 1) * log clamp(onehot(y)_k, 1e-4, 1)``, which is
    ``9.2103 * (1 - p_y)`` up to the ``1e-7`` clamp.

    Args:
        logits: ``[N, K]`` class logits or ``[N, L, V]`` token logits.
        targets: ``[N]`` or ``[N, L]`` integer targets.
        alpha: Weight of the CE term.
        beta: Weight of the reverse-CE term.
        ignore_index: Target value of positions left out (padding, prompt tokens).
        reduction: ``mean`` over counted positions, ``sum``, or ``none`` (shape of ``targets``,
            zero at ignored positions).
        include_padding: Count ignored positions as predictions of ``pad_token_id``, as the GOLD
            code does (it pads targets with the pad id instead of masking them).
        pad_token_id: The pad id; required with ``include_padding``.

    Returns:
        The loss (a scalar unless ``reduction="none"``), computed in float32.
    """
    flat_logits, flat_targets = _flat(logits, targets)
    safe, counted = _valid_targets(flat_targets, ignore_index, include_padding, pad_token_id)
    logp = F.log_softmax(flat_logits.float(), dim=-1)
    logp_y = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    p = logp.exp().clamp(min=P_FLOOR, max=1.0)
    p_y = p.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    # log q_y = 0 and log q_k = log(1e-4) elsewhere, so the sum reduces to the off-target mass.
    rce = RCE_SCALE * (p.sum(-1) - p_y)
    per_pos = alpha * (-logp_y) + beta * rce
    return _reduce(per_pos, counted.to(per_pos.dtype), targets.shape, reduction)


def cross_entropy(
    logits: Tensor,
    targets: Tensor,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    *,
    include_padding: bool = False,
    pad_token_id: int | None = None,
) -> Tensor:
    """Plain cross-entropy with the same shapes and masking as :func:`symmetric_cross_entropy`.

    Args:
        logits: ``[N, K]`` class logits or ``[N, L, V]`` token logits.
        targets: ``[N]`` or ``[N, L]`` integer targets.
        ignore_index: Target value of positions left out.
        reduction: ``mean`` over counted positions, ``sum`` or ``none``.
        include_padding: Count ignored positions as predictions of ``pad_token_id``.
        pad_token_id: The pad id; required with ``include_padding``.

    Returns:
        The loss, computed in float32.
    """
    flat_logits, flat_targets = _flat(logits, targets)
    safe, counted = _valid_targets(flat_targets, ignore_index, include_padding, pad_token_id)
    per_pos = F.cross_entropy(flat_logits.float(), safe, reduction="none")
    return _reduce(per_pos, counted.to(per_pos.dtype), targets.shape, reduction)


def loss_fn(name: str, alpha: float = 1.0, beta: float = 1.0) -> Callable[..., Tensor]:
    """The loss called ``name`` as a function of ``(logits, targets, **kwargs)``.

    Args:
        name: ``ce`` or ``sce``.
        alpha: SCE weight of CE (ignored by ``ce``).
        beta: SCE weight of reverse CE (ignored by ``ce``).

    Returns:
        A callable taking ``logits, targets`` and the keyword options of :func:`cross_entropy`.

    Raises:
        ValueError: an unknown loss name.
    """
    if name == "ce":
        return cross_entropy
    if name == "sce":
        return partial(symmetric_cross_entropy, alpha=alpha, beta=beta)
    raise ValueError(f"unknown loss {name!r}: expected one of {list(LOSS_NAMES)}")
