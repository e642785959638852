"""Diversity of generated texts (gold_ray.run.diversity)."""

import pytest

from gold_ray.run.diversity import record_text, records_diversity, text_diversity


def test_copies_are_near_copies_and_distinct_texts_are_not():
    copies = text_diversity(["the film was a delight"] * 4)
    assert copies["nearest_overlap"] == 1.0 and copies["near_copies"] == 1.0
    assert copies["distinct_2"] == pytest.approx(4 / 16)  # 4 distinct bigrams of 16
    apart = text_diversity(["the film was a delight", "dull plot , wooden acting", "I left early"])
    assert apart["nearest_overlap"] == 0.0 and apart["near_copies"] == 0.0 and apart["distinct_2"] == 1.0


def test_nearest_overlap_is_the_jaccard_of_the_closest_other_text():
    # "a b c" and "a b d": bigrams {ab, bc} and {ab, bd} share 1 of 3; "x y" shares nothing.
    d = text_diversity(["a b c", "a b d", "x y"])
    assert d["nearest_overlap"] == pytest.approx((1 / 3 + 1 / 3 + 0) / 3)
    assert d["distinct_1"] == pytest.approx(6 / 8)


def test_a_subsample_of_fixed_size_drawn_the_same_way_each_call():
    texts = [" ".join(["word"] * (i % 7) + [f"sample {i}"] + ["the set"] * (i % 3)) for i in range(50)]
    d = text_diversity(texts, sample=20)
    assert d["texts"] == 20 and d == text_diversity(texts, sample=20)
    assert text_diversity(texts, sample=20, seed=1) != d


def test_too_few_texts_give_no_pairwise_measure():
    assert text_diversity([])["distinct_2"] is None
    one = text_diversity(["only one text here", "  "])
    assert one["texts"] == 1 and one["nearest_overlap"] is None and one["distinct_2"] == 1.0


def test_records_join_their_input_fields():
    rec = {"premise": "It rained.", "hypothesis": "The ground is wet.", "label": "entailment"}
    assert record_text(rec, ["premise", "hypothesis"]) == "It rained. The ground is wet."
    assert records_diversity([rec, rec], ["premise", "hypothesis"])["near_copies"] == 1.0

