import math

import numpy as np
import pytest
import torch

from gold_ray.student.ood import (
    band_indices,
    energy_from_logits,
    hashed_uniform_scores,
    msp_score,
    nll_score,
    noise_filter_mask,
    score_quantiles,
    token_energy,
    token_nll,
)


def lse(row, t=1.0):
    return math.log(sum(math.exp(v / t) for v in row))


# --- energy ---------------------------------------------------------------------------------


def test_energy_matches_hand_computation_at_t1_and_t2():
    rows = [[2.0, -1.0, 0.5], [0.0, 0.0, 0.0]]
    got = energy_from_logits(np.array(rows))
    assert got.dtype == np.float64 and got.shape == (2,)
    assert got.tolist() == pytest.approx([-lse(r) for r in rows], rel=1e-12)
    assert got[1] == pytest.approx(-math.log(3))
    got_t2 = energy_from_logits(np.array(rows), temperature=2.0)
    assert got_t2.tolist() == pytest.approx([-2.0 * lse(r, 2.0) for r in rows], rel=1e-12)
    assert not np.allclose(got, got_t2)


def test_energy_accepts_torch_in_any_float_dtype():
    rows = [[1.0, 3.0], [-2.0, 0.25]]
    want = [-lse(r) for r in rows]
    assert energy_from_logits(torch.tensor(rows)).tolist() == pytest.approx(want, rel=1e-6)
    assert energy_from_logits(torch.tensor(rows, dtype=torch.bfloat16)).tolist() == pytest.approx(
        want, rel=1e-2
    )


def test_energy_is_stable_for_huge_logits():
    got = energy_from_logits(np.array([[1000.0, 1000.0], [-1000.0, -1001.0]]))
    assert got[0] == pytest.approx(-(1000 + math.log(2)))
    assert got[1] == pytest.approx(-(-1000 + math.log(1 + math.exp(-1))))


def test_larger_top_logit_means_lower_energy():
    confident = [8.0, 0.0, 0.0, 0.0]
    flat = [0.0, 0.0, 0.0, 0.0]
    e_conf, e_flat = energy_from_logits(np.array([confident, flat]))
    assert e_conf < e_flat
    # Same orientation as MSP: the confident row scores as less OOD.
    m_conf, m_flat = msp_score(np.array([confident, flat]))
    assert m_conf < m_flat


def test_non_finite_rows_give_nan_and_leave_other_rows_intact():
    logits = np.array([[1.0, 2.0], [np.nan, 0.0], [np.inf, 0.0], [0.0, -np.inf], [3.0, 3.0]])
    with np.errstate(all="raise"):  # no warnings from inf - inf on the broken rows
        e = energy_from_logits(logits)
    assert np.isnan(e[1:4]).all()
    assert e[0] == pytest.approx(-lse([1.0, 2.0]))
    assert e[4] == pytest.approx(-(3 + math.log(2)))
    assert np.isnan(msp_score(logits)[1:4]).all()
    assert np.isnan(nll_score(logits, [0, 0, 0, 0, 0])[1:4]).all()


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="temperature"):
        energy_from_logits(np.zeros((2, 3)), temperature=0.0)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        energy_from_logits(np.zeros(3))
    with pytest.raises(ValueError, match="range"):
        nll_score(np.zeros((2, 3)), [0, 3])
    with pytest.raises(ValueError, match="mode"):
        token_energy(np.zeros((1, 2, 3)), np.ones((1, 2)), mode="vocab")
    with pytest.raises(ValueError, match=r"\[N, L\]"):
        token_energy(np.zeros((1, 2, 3)), np.ones((1, 3)))


def test_empty_batch_gives_empty_scores():
    assert energy_from_logits(np.zeros((0, 2))).shape == (0,)
    assert band_indices(np.array([]), 0.5, 0.8).tolist() == []
    assert noise_filter_mask(np.array([]), 0.2).tolist() == []


# --- MSP and NLL ----------------------------------------------------------------------------


def test_msp_and_nll_match_softmax():
    logits = np.array([[2.0, 0.0, -1.0], [0.1, 0.2, 0.3]])
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert msp_score(logits).tolist() == pytest.approx((-p.max(-1)).tolist())
    assert nll_score(logits, np.array([2, 0])).tolist() == pytest.approx(
        [-math.log(p[0, 2]), -math.log(p[1, 0])]
    )
    assert nll_score(torch.tensor(logits), torch.tensor([2, 0])).tolist() == pytest.approx(
        [-math.log(p[0, 2]), -math.log(p[1, 0])], rel=1e-6
    )


# --- token-level ----------------------------------------------------------------------------


def _token_logits(seed=0, n=2, length=4, vocab=5):
    return np.random.default_rng(seed).normal(size=(n, length, vocab)) * 3


def test_token_energy_masked_vs_code_faithful_with_padding():
    logits = _token_logits()
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]])
    per_pos = -np.log(np.exp(logits).sum(-1))
    masked = token_energy(logits, mask)
    faithful = token_energy(logits, mask, mode="code_faithful")
    assert masked.tolist() == pytest.approx([per_pos[0, :2].mean(), per_pos[1, :3].mean()])
    assert faithful.tolist() == pytest.approx(per_pos.mean(-1).tolist())
    assert not np.allclose(masked, faithful)


def test_token_energy_modes_agree_without_padding_and_with_temperature():
    logits = _token_logits(seed=1)
    full = np.ones((2, 4))
    for t in (1.0, 0.5):
        masked = token_energy(logits, full, temperature=t)
        assert masked.tolist() == pytest.approx(
            token_energy(logits, full, temperature=t, mode="code_faithful").tolist()
        )
        want = (-t * np.log(np.exp(logits / t).sum(-1))).mean(-1)
        assert masked.tolist() == pytest.approx(want.tolist())


def test_token_energy_torch_matches_numpy_and_ignores_broken_padding():
    logits = _token_logits(seed=2)
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]])
    want = token_energy(logits, mask)
    got = token_energy(torch.tensor(logits, dtype=torch.float32), torch.tensor(mask, dtype=torch.bool))
    assert got.tolist() == pytest.approx(want.tolist(), rel=1e-5)
    broken = logits.copy()
    broken[0, 3, 0] = np.nan  # a padding position: ignored when masked, counted by code_faithful
    assert token_energy(broken, mask)[0] == pytest.approx(want[0])
    assert np.isnan(token_energy(broken, mask, mode="code_faithful")[0])
    broken[1, 0, 1] = np.inf  # a real token: the row becomes NaN
    assert np.isnan(token_energy(torch.tensor(broken), mask)[1])


def test_token_energy_row_without_real_tokens_is_nan():
    got = token_energy(_token_logits(), np.array([[0, 0, 0, 0], [1, 1, 1, 1]]))
    assert np.isnan(got[0]) and np.isfinite(got[1])


def test_token_nll_averages_real_tokens_and_ignores_padding_ids():
    logits = _token_logits(seed=3)
    ids = np.array([[1, 4, -100, -100], [0, 2, 3, 0]])
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = [-(logp[0, 0, 1] + logp[0, 1, 4]) / 2, -(logp[1, 0, 0] + logp[1, 1, 2] + logp[1, 2, 3]) / 3]
    assert token_nll(logits, ids, mask).tolist() == pytest.approx(want)
    got = token_nll(torch.tensor(logits), torch.tensor(ids), torch.tensor(mask))
    assert got.tolist() == pytest.approx(want)
    with pytest.raises(ValueError, match="range"):
        token_nll(logits, np.array([[1, 9, 0, 0], [0, 0, 0, 0]]), mask)


# --- band selection -------------------------------------------------------------------------


def test_gold_band_on_eight_samples_picks_ranks_four_and_five():
    scores = np.array([0.9, -3.0, 2.5, 0.1, -1.0, 4.0, 1.7, 3.1])
    # ascending: idx1(-3.0) idx4(-1.0) idx3(0.1) idx0(0.9) | idx6(1.7) idx2(2.5) | idx7(3.1) idx5(4.0)
    got = band_indices(scores, 0.5, 0.8)
    assert got.tolist() == [6, 2]
    assert got.dtype == np.int64
    assert band_indices(torch.tensor(scores), 0.5, 0.8).tolist() == [6, 2]


@pytest.mark.parametrize(
    ("n", "lo", "hi", "count"),
    [(8, 0.5, 0.8, 2), (10, 0.5, 0.8, 3), (100, 0.29, 0.58, 29), (5, 0.0, 1.0, 5), (4, 0.5, 0.6, 0)],
)
def test_band_size_follows_the_floor_rule(n, lo, hi, count):
    assert len(band_indices(np.arange(n, dtype=float)[::-1], lo, hi)) == count


def test_ties_are_broken_by_index():
    scores = np.array([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    # ascending, stable: 1, 3, 5, 7 (the zeros) then 0, 2, 4, 6 -> ranks 4 and 5 are 0 and 2
    assert band_indices(scores, 0.5, 0.8).tolist() == [0, 2]


def test_all_equal_scores_select_deterministically_with_the_right_count():
    scores = np.full(8, 0.37)
    assert band_indices(scores, 0.5, 0.8).tolist() == [4, 5]
    assert band_indices(np.full(20, -2.0), 0.5, 0.8).tolist() == list(range(10, 16))


def test_nan_rows_are_excluded_before_ranking_and_never_selected():
    scores = np.array([np.nan, 5.0, 1.0, np.inf, 3.0, 2.0, np.nan, 4.0, 0.0, -np.inf, 6.0, 7.0])
    got = band_indices(scores, 0.5, 0.8)
    finite = [1, 2, 4, 5, 7, 8, 10, 11]  # n = 8 finite scores: 0,1,2,3,4,5,6,7 at these indices
    assert not set(got.tolist()) & {0, 3, 6, 9}
    assert got.tolist() == [7, 1]  # scores 4.0 and 5.0: ranks 4 and 5 of the eight finite ones
    assert set(got.tolist()) <= set(finite)
    assert band_indices(np.full(5, np.nan), 0.5, 0.8).tolist() == []


def test_batch_of_one_gives_an_empty_band():
    assert band_indices(np.array([1.5]), 0.5, 0.8).tolist() == []
    assert band_indices(np.array([1.5]), 0.0, 1.0).tolist() == [0]


def test_invalid_band_raises():
    with pytest.raises(ValueError):
        band_indices(np.zeros(4), 0.8, 0.5)
    with pytest.raises(ValueError):
        band_indices(np.zeros(4), -0.1, 0.5)
    with pytest.raises(ValueError):  # an empty band is refused here as in the config
        band_indices(np.zeros(4), 0.5, 0.5)


def test_random_control_scores_are_fixed_per_input_and_spread_evenly():
    inputs = [{"text": f"review number {i}"} for i in range(2000)]
    scores = hashed_uniform_scores(inputs)
    assert scores.dtype == np.float64 and ((scores >= 0) & (scores < 1)).all()
    assert len(set(scores.tolist())) == len(inputs)
    # Fixed per input: same in another call, key order aside, and independent of its neighbours.
    again = hashed_uniform_scores([{"text": "review number 7"}, {"text": "review number 3"}])
    assert again.tolist() == [scores[7], scores[3]]
    pair = hashed_uniform_scores([{"a": "x", "b": "y"}, {"b": "y", "a": "x"}])
    assert pair[0] == pair[1]
    # Evenly spread, so a band over them is a random subset of the right size.
    assert np.histogram(scores, bins=10, range=(0, 1))[0].min() > 150
    assert len(band_indices(scores, 0.5, 0.8)) == 600
    assert hashed_uniform_scores([]).shape == (0,)


# --- noise filter and quantiles -------------------------------------------------------------


def test_noise_filter_drops_the_highest_scores_and_nan_rows():
    scores = np.array([0.3, 9.0, 0.1, np.nan, 5.0, 0.2, 0.4, 0.5, 0.6])
    keep = noise_filter_mask(scores, 0.25)  # 8 finite -> keep floor(0.75 * 8) = 6, drop 9.0 and 5.0
    assert keep.dtype == bool
    assert keep.tolist() == [True, False, True, False, False, True, True, True, True]


def test_noise_filter_zero_keeps_every_finite_row_and_one_keeps_none():
    scores = np.array([1.0, np.nan, 2.0, -np.inf])
    assert noise_filter_mask(scores, 0.0).tolist() == [True, False, True, False]
    assert noise_filter_mask(scores, 1.0).tolist() == [False, False, False, False]
    with pytest.raises(ValueError):
        noise_filter_mask(scores, 1.5)


def test_noise_filter_matches_the_band_top_edge_on_eight():
    scores = np.arange(8.0)
    assert np.flatnonzero(~noise_filter_mask(scores, 0.2)).tolist() == [6, 7]


def test_score_quantiles_over_finite_scores():
    scores = np.array([np.nan, *range(11), np.inf])
    q = score_quantiles(scores)
    assert q == pytest.approx({"p10": 1.0, "p25": 2.5, "p50": 5.0, "p75": 7.5, "p90": 9.0, "mean": 5.0})
    assert all(isinstance(v, float) for v in q.values())
    assert score_quantiles(np.array([np.nan, np.nan])) == {}
    assert score_quantiles(np.array([])) == {}
