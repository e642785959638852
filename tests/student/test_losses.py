import math

import pytest
import torch

from gold_ray.student.losses import RCE_SCALE, cross_entropy, loss_fn, symmetric_cross_entropy


def _softmax(row):
    z = [math.exp(v) for v in row]
    s = sum(z)
    return [v / s for v in z]


def test_rce_scale_is_minus_log_1e4():
    assert abs(RCE_SCALE - 9.2103) < 1e-4


def test_sce_matches_closed_form_on_class_logits():
    rows = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]]
    gold = [0, 2]
    alpha, beta = 0.1, 1.0
    expected = []
    for row, y in zip(rows, gold, strict=True):
        p = _softmax(row)
        expected.append(alpha * -math.log(p[y]) + 9.2103 * beta * (1 - p[y]))
    got = symmetric_cross_entropy(torch.tensor(rows), torch.tensor(gold), alpha=alpha, beta=beta)
    assert got.item() == pytest.approx(sum(expected) / 2, rel=1e-4)
    per_row = symmetric_cross_entropy(torch.tensor(rows), torch.tensor(gold), alpha, beta, reduction="none")
    assert per_row.tolist() == pytest.approx(expected, rel=1e-4)


def test_sce_alpha_only_is_ce_and_beta_only_is_rce():
    logits = torch.tensor([[1.0, -2.0, 0.3, 0.0]])
    y = torch.tensor([3])
    ce = cross_entropy(logits, y).item()
    p_y = torch.softmax(logits, -1)[0, 3].item()
    assert symmetric_cross_entropy(logits, y, alpha=1.0, beta=0.0).item() == pytest.approx(ce, rel=1e-6)
    assert symmetric_cross_entropy(logits, y, alpha=0.0, beta=2.0).item() == pytest.approx(
        2 * RCE_SCALE * (1 - p_y), rel=1e-5
    )


def test_token_logits_mask_ignored_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, 4, -100], [2, -100, -100]])
    loss = symmetric_cross_entropy(logits, targets)
    real = [(0, 0), (0, 1), (1, 0)]
    by_hand = [symmetric_cross_entropy(logits[i, t][None], targets[i, t][None]).item() for i, t in real]
    assert loss.item() == pytest.approx(sum(by_hand) / 3, rel=1e-5)
    # Changing the logits at masked positions must not change the loss.
    changed = logits.clone()
    changed[0, 2] += 50
    changed[1, 1:] -= 50
    assert symmetric_cross_entropy(changed, targets).item() == pytest.approx(loss.item(), rel=1e-6)
    assert cross_entropy(changed, targets).item() == pytest.approx(cross_entropy(logits, targets).item())


def test_include_padding_counts_pad_positions_as_pad_predictions():
    torch.manual_seed(1)
    logits = torch.randn(1, 4, 6)
    targets = torch.tensor([[3, -100, -100, -100]])
    padded = torch.tensor([[3, 0, 0, 0]])
    code = symmetric_cross_entropy(logits, targets, include_padding=True, pad_token_id=0)
    assert code.item() == pytest.approx(symmetric_cross_entropy(logits, padded).item(), rel=1e-6)
    assert code.item() != pytest.approx(symmetric_cross_entropy(logits, targets).item(), rel=1e-3)
    with pytest.raises(ValueError, match="pad_token_id"):
        cross_entropy(logits, targets, include_padding=True)


def test_gradients_are_finite_even_for_confident_logits():
    logits = torch.tensor([[60.0, -60.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    loss = symmetric_cross_entropy(logits, torch.tensor([1, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_all_ignored_gives_zero_not_nan():
    logits = torch.randn(2, 3, requires_grad=True)
    loss = cross_entropy(logits, torch.tensor([-100, -100]))
    assert loss.item() == 0.0
    loss.backward()


def test_shape_mismatch_and_unknown_names_raise():
    with pytest.raises(ValueError, match="do not match"):
        cross_entropy(torch.randn(2, 3), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), reduction="avg")
    with pytest.raises(ValueError, match="unknown loss"):
        loss_fn("gce")


def test_loss_fn_binds_alpha_beta():
    logits = torch.tensor([[0.2, 1.0]])
    y = torch.tensor([0])
    assert loss_fn("sce", 0.5, 2.0)(logits, y).item() == pytest.approx(
        symmetric_cross_entropy(logits, y, 0.5, 2.0).item()
    )
    assert loss_fn("ce", 0.5, 2.0)(logits, y).item() == pytest.approx(cross_entropy(logits, y).item())
