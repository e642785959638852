"""Influence of training examples on a validation loss, restricted to the student's output layer.

ProGen (methods.md 4.4) ranks synthetic examples by the influence function of Koh & Liang (2017):
``infl(z) = -grad L_CE(z)^T H^-1 grad L_val``, where ``L_val`` is the reverse cross-entropy (RCE)
on a synthetic validation set and ``H`` the Hessian of the training loss. Negative influence means
helpful: up-weighting ``z`` lowers the validation loss.

The authors take gradients over all of DistilBERT's parameters and estimate ``H^-1 v`` with LiSSA.
Here the parameters are only the student's **output layer** (the last linear map from features to
class logits), the rest of the network held fixed: the classic last-layer approximation. Its
gradients are closed-form (``(p - e_y) x^T``), its Hessian-vector products are exact and cheap, and
``(H + damping I)^-1 v`` is solved by conjugate gradients, so scoring thousands of examples costs
one forward pass of the student over them. What it cannot see is how an example would have changed
the features themselves.

RCE with the one-hot target clamped at ``A = 1e-4`` is ``-log(A) (1 - p_y)``; ProGen's code smooths the
one-hot with a softmax instead, which gives ``const - p_y``. Both are affine in ``p_y``, so the
influence ranking is the same; the clamped form is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

RCE_LOG_CLAMP = float(-np.log(1e-4))
"""``-log(A)`` of the clamped one-hot target (A = 1e-4), the scale of the RCE loss."""


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``[N, K]`` logits (float64)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _with_bias(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    return np.concatenate([x, np.ones((len(x), 1))], axis=1)


def _hvp(v: np.ndarray, x: np.ndarray, p: np.ndarray, damping: float) -> np.ndarray:
    """``(H + damping I) v`` for the mean softmax cross-entropy of a linear layer; ``v`` is ``[K, D+1]``."""
    z = x @ v.T  # [N, K]: the change of each example's logits along v
    a = p * z - p * (p * z).sum(axis=1, keepdims=True)  # (diag(p) - p p^T) z, per example
    return a.T @ x / len(x) + damping * v


def _conjugate_gradient(
    matvec: Any, b: np.ndarray, tol: float = 1e-10, max_iter: int | None = None
) -> np.ndarray:
    """Solve ``matvec(s) = b`` for a symmetric positive definite operator."""
    s = np.zeros_like(b)
    r = b.copy()
    d = r.copy()
    rs = float((r * r).sum())
    target = tol * max(rs, 1e-300)
    for _ in range(max_iter or 4 * b.size):
        if rs <= target:
            break
        hd = matvec(d)
        step = rs / float((d * hd).sum())
        s += step * d
        r -= step * hd
        rs_new = float((r * r).sum())
        d = r + (rs_new / rs) * d
        rs = rs_new
    return s


def validation_gradient(val_features: np.ndarray, val_labels: Sequence[int], weight: np.ndarray,
                        bias: np.ndarray) -> np.ndarray:
    """Gradient of the mean RCE loss on the validation set w.r.t. ``[W | b]`` (``[K, D+1]``)."""
    x = _with_bias(val_features)
    p = softmax(x @ np.concatenate([weight, bias[:, None]], axis=1).T)
    y = np.asarray(val_labels, dtype=np.int64)
    onehot = np.eye(p.shape[1])[y]
    py = p[np.arange(len(y)), y][:, None]
    dz = -RCE_LOG_CLAMP * py * (onehot - p)  # d/dz of -log(A) (1 - p_y)
    return dz.T @ x / len(x)


def influence_scores(
    features: np.ndarray,
    labels: Sequence[int],
    weight: np.ndarray,
    bias: np.ndarray,
    val_features: np.ndarray,
    val_labels: Sequence[int],
    *,
    damping: float = 0.01,
    hessian_features: np.ndarray | None = None,
) -> np.ndarray:
    """Influence of up-weighting each training example on the validation RCE (negative = helpful).

    Args:
        features: ``[N, D]`` inputs of the output layer for the examples to score.
        labels: Their label ids.
        weight: ``[K, D]`` output-layer weight.
        bias: ``[K]`` output-layer bias.
        val_features: ``[M, D]`` output-layer inputs of the validation examples.
        val_labels: Their label ids.
        damping: Added to the Hessian's diagonal (an L2 term of the training loss; keeps it invertible).
        hessian_features: ``[N', D]`` examples the training-loss Hessian is averaged over; default
            ``features``.

    Returns:
        ``float64`` array of length N: ``-grad L_CE(z)^T (H + damping I)^-1 grad L_RCE(V)``.
        Removing example ``z`` from a training set of ``n`` changes the validation loss by about
        ``-infl(z) / n``.
    """
    if damping <= 0:
        raise ValueError(f"damping must be > 0, got {damping}")
    theta = np.concatenate([np.asarray(weight, dtype=np.float64), np.asarray(bias, dtype=np.float64)[:, None]], axis=1)
    x = _with_bias(features)
    p = softmax(x @ theta.T)
    xh = x if hessian_features is None else _with_bias(hessian_features)
    ph = p if hessian_features is None else softmax(xh @ theta.T)
    g_val = validation_gradient(val_features, val_labels, theta[:, :-1], theta[:, -1])
    s_test = _conjugate_gradient(lambda v: _hvp(v, xh, ph, damping), g_val)
    y = np.asarray(labels, dtype=np.int64)
    resid = p - np.eye(p.shape[1])[y]  # dCE/dz per example
    # grad_theta CE(z) = resid x^T, so its inner product with s_test is resid^T (s_test x).
    return -np.einsum("nk,nk->n", resid, x @ s_test.T)


def output_layer_features(student: Any, records: Sequence[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The inputs of a classifier student's output layer, and that layer's weight and bias.

    The output layer is the last ``torch.nn.Linear`` of the model that maps to the task's classes.
    Its inputs are captured with a forward hook in eval mode, and checked to reproduce the logits.

    Args:
        student: A :class:`~gold_ray.student.model.ClassifierStudent`.
        records: Records with the task's input fields.

    Returns:
        ``(features [N, D], weight [K, D], bias [K])`` as float64 arrays.

    Raises:
        ValueError: the model has no such layer, or its inputs do not reproduce the logits.
    """
    import torch

    n_labels = len(student.task.label_names)
    heads = [m for m in student.model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == n_labels]
    if not heads:
        raise ValueError(f"student {student.model_path!r}: no linear output layer with {n_labels} outputs")
    head = heads[-1]
    captured: list[np.ndarray] = []

    def hook(module: Any, inputs: tuple) -> None:
        captured.append(inputs[0].detach().float().cpu().numpy().reshape(-1, head.in_features))

    handle = head.register_forward_pre_hook(hook)
    try:
        logits = student.logits(list(records))
    finally:
        handle.remove()
    feats = np.concatenate(captured) if captured else np.zeros((0, head.in_features))
    weight = head.weight.detach().double().cpu().numpy()
    bias = head.bias.detach().double().cpu().numpy() if head.bias is not None else np.zeros(n_labels)
    if len(feats) != len(logits) or not np.allclose(feats @ weight.T + bias, logits, atol=1e-3, rtol=1e-3):
        raise ValueError(f"student {student.model_path!r}: the last {n_labels}-way linear layer is not the output layer")
    return feats.astype(np.float64), weight, bias
