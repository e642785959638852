import json
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gold_ray.run.tasks import LabelSpec, load_task
from gold_ray.teacher.parsing import (
    CHATTER_PATTERNS,
    MAX_RAW_CHARS,
    Deduplicator,
    ParseResult,
    label_leak,
    normalized_hash,
    parse_batch,
    parse_generation,
)
from gold_ray.types import REJECT_REASONS, Generation, Prompt

SST2 = load_task("sst2")
RTE = load_task("rte")
SVAMP = load_task("svamp")
AG_NEWS = load_task("ag_news")
TASKS = {"sst2": SST2, "rte": RTE, "svamp": SVAMP}

INSTRUCTION = (
    "Describe a film you loved in vivid language, mentioning the soundtrack and the lead actor. "
    "Example: The cast is wonderful, and the quiet final scene stayed with me for days."
)
CHAT = Prompt(kind="train", label="positive", messages=({"role": "user", "content": INSTRUCTION},))
GOLD_PREFILL = Prompt(
    kind="train",
    label="entailment",
    messages=({"role": "user", "content": "Give me a novel sample."}, {"role": "assistant", "content": ""}),
    prefill="Sure! here is a novel sample for you. The premise makes the hypothesis true.\nPremise:",
)
ZEROGEN = Prompt(
    kind="train",
    label="positive",
    text='The movie review in positive sentiment for movie "Heat" is: "',
    prefill='"',
)


def parse(task, text, prompt=CHAT):
    return parse_generation(task, prompt, text)


def assert_reject(result, reason, *detail_words):
    assert result.fields is None, f"accepted {result.fields}, expected {reason}"
    assert result.reason == reason, f"{result.reason} ({result.detail}), expected {reason}"
    for word in detail_words:
        assert word.lower() in result.detail.lower(), result.detail


# --- accepted samples -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "The film was a delight from start to finish.",
        '"The film was a delight from start to finish."',
        'Review: "The film was a delight from start to finish."',
        '"Review": "The film was a delight from start to finish."',
        "**review:** The film was a delight from start to finish.",
        "  The film was a delight from start to finish.\n\nI hope this helps!",
        "The film was a delight from start to finish.\nSentiment: positive",
        "The film was a delight from start to finish.<|im_end|>",
        "1. The film was a delight from start to finish.",
        "2) The film was a delight from start to finish.",
    ],
)
def test_single_field_cleaning_yields_the_review(text):
    result = parse(SST2, text)
    assert result.fields == {"text": "The film was a delight from start to finish."}
    assert result.reason is None and result.accepted


def test_quoted_value_is_cut_at_the_first_closing_quote():
    result = parse(SST2, '"A sharp, funny script." And then the model kept talking about other things.')
    assert result.fields == {"text": "A sharp, funny script."}


def test_unclosed_quote_is_cut_at_the_first_newline():
    result = parse(SST2, '"A sharp, funny script with a warm heart.\nUser: write another')
    assert result.fields == {"text": "A sharp, funny script with a warm heart."}


def test_zerogen_prefill_keeps_only_the_opening_quote():
    result = parse(SST2, 'A tense, gripping thriller with two great leads." The end.', ZEROGEN)
    assert result.fields == {"text": "A tense, gripping thriller with two great leads."}


def test_multiline_review_without_blank_line_is_joined():
    result = parse(SST2, "A quiet film about grief\nthat earns every one of its tears.")
    assert result.fields == {"text": "A quiet film about grief that earns every one of its tears."}


@pytest.mark.parametrize(
    "text",
    [
        "I am sorry I paid for this film; it is a dull, lifeless mess.",
        "A positive surprise: the sequel is better than the original.",
        "Despite positive reviews, the film is a bore from the first scene.",
        "Here is a film that dares to be different, and mostly succeeds.",
        "I cannot believe how much fun this clumsy little comedy turned out to be.",
        "Sure, the effects are impressive, but the plot is paper thin.",
        "#1 at the box office, and it deserves every ticket sold.",
    ],
)
def test_ordinary_reviews_are_not_mistaken_for_chatter_or_leaks(text):
    result = parse(SST2, text)
    assert result.fields == {"text": text}, result.detail


@pytest.mark.parametrize(
    "text",
    [
        "Premise: The museum opened in 1998 and drew large crowds.\nHypothesis: The museum is open.",
        "premise: The museum opened in 1998 and drew large crowds.\nHYPOTHESIS: The museum is open.",
        "**Premise:** The museum opened in 1998 and drew large crowds.\n**Hypothesis:** The museum is open.",
        "**Premise**: The museum opened in 1998 and drew large crowds.\n**Hypothesis**: The museum is open.",
        '1. Premise: "The museum opened in 1998 and drew large crowds."\n2. Hypothesis: "The museum is open."',
        "### Premise: The museum opened in 1998 and drew large crowds.\n### Hypothesis: The museum is open.",
        "- Premise: The museum opened in 1998 and drew large crowds.\n- Hypothesis: The museum is open.",
        '{"Premise": "The museum opened in 1998 and drew large crowds.", "Hypothesis": "The museum is open."}',
        "Premise: The museum opened in 1998 and drew large crowds. Hypothesis: The museum is open.",
        "Hypothesis: The museum is open.\nPremise: The museum opened in 1998 and drew large crowds.",
        "Sure! Here is a pair:\n\nPremise: The museum opened in 1998 and drew large crowds.\n\n"
        "Hypothesis: The museum is open.\n\nI hope this helps!",
    ],
)
def test_pair_fields_are_found_by_their_tags_in_many_formats(text):
    result = parse(RTE, text)
    assert result.fields == {
        "text_a": "The museum opened in 1998 and drew large crowds.",
        "text_b": "The museum is open.",
    }, result.detail


def test_gold_style_prefill_chatter_before_the_first_tag_is_dropped():
    text = " The museum opened in 1998 and drew large crowds.\nHypothesis: The museum is open."
    result = parse(RTE, text, GOLD_PREFILL)
    assert result.fields == {
        "text_a": "The museum opened in 1998 and drew large crowds.",
        "text_b": "The museum is open.",
    }


def test_two_word_display_names_are_tags():
    mrpc = load_task("mrpc")
    result = parse(
        mrpc, "Sentence 1: Profits rose 12 percent last quarter.\nSentence2: The firm earned more money."
    )
    assert result.fields == {
        "text_a": "Profits rose 12 percent last quarter.",
        "text_b": "The firm earned more money.",
    }


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("30", "30"),
        ("$1,200.00", "1200"),
        ("19.0", "19"),
        ("0.50 dollars", "0.5"),
        ("12 + 7 = 19", "19"),
        ("**19** muffins", "19"),
        ("-4", "-4"),
        ("**-4**", "-4"),
        ("3/4", "0.75"),
        ("100", "100"),
    ],
)
def test_svamp_answer_is_the_normalised_number(answer, expected):
    text = f"Problem: A baker made 48 muffins and sold 29 of them. How many are left?\nAnswer: {answer}"
    result = parse(SVAMP, text)
    assert result.fields == {
        "question": "A baker made 48 muffins and sold 29 of them. How many are left?",
        "answer": expected,
    }


def test_svamp_answer_without_a_number_is_a_missing_field():
    text = "Problem: A baker made 48 muffins and sold 29 of them. How many are left?\nAnswer: nineteen"
    assert_reject(parse(SVAMP, text), "missing_field", "answer")


def test_a_label_word_before_the_word_label_is_no_leak():
    tickets = SST2.model_copy(update={"name": "tickets", "sample_noun": "support ticket", "labels": [
        LabelSpec(name="shipping", description="deliveries"), LabelSpec(name="billing", description="payments")]})
    assert label_leak(tickets, "The shipping label on my parcel has the wrong address.") is None
    assert label_leak(tickets, "This billing ticket is about my invoice.")  # the sample noun still counts


def test_a_text_answer_of_digits_is_kept():
    # A question-answering task's answer may be a year or a count, however its answer_type reads.
    qa = SVAMP.model_copy(update={"answer_type": "text", "name": "qa"})
    result = parse(qa, "Problem: In which year did the first person walk on the Moon?\nAnswer: 1969")
    assert result.reason is None and result.fields["answer"] == "1969"
    assert_reject(parse(qa, "Problem: 12 34 56 78 90 12 34 56 78 90 12\nAnswer: 7"), "refusal", "question")


# --- one test per reject reason -------------------------------------------------------------


def test_error_generation_keeps_the_error_text():
    dedup = Deduplicator()
    gens = [Generation(text="", error="teacher timeout after 30 s"), Generation(text="A bright, funny film.")]
    results = parse_batch(SST2, [CHAT, CHAT], gens, dedup)
    assert_reject(results[0], "error", "teacher timeout after 30 s")
    assert results[1].fields == {"text": "A bright, funny film."}
    assert len(dedup) == 1


@pytest.mark.parametrize("text", ["", "   \n\t  ", '""', "...!!! ---", "**Review:** \n\n"])
def test_empty(text):
    assert_reject(parse(SST2, text), "empty")


def test_tags_without_values_are_empty_and_name_the_field():
    assert_reject(parse(RTE, "Premise:\nHypothesis: The museum is open."), "empty", "text_a")


def test_too_short_names_the_field():
    assert_reject(parse(SST2, "Meh."), "too_short", "text")
    text = "Premise: The museum opened in 1998 and drew large crowds.\nHypothesis: Yes."
    assert_reject(parse(RTE, text), "too_short", "text_b")


def test_too_long_names_the_field():
    review = "A slow, sprawling epic that loses its way. " * 12  # about 500 characters > 400
    assert_reject(parse(SST2, review), "too_long", "text")


def test_huge_raw_text_is_too_long_before_any_parsing():
    assert_reject(parse(SST2, "great film " * 10_000), "too_long", str(MAX_RAW_CHARS))
    assert_reject(parse(SST2, "x" * (MAX_RAW_CHARS + 1)), "too_long")


def test_missing_field_names_the_absent_tag():
    assert_reject(
        parse(RTE, "Premise: The museum opened in 1998 and drew large crowds."), "missing_field", "text_b"
    )
    text = "The museum opened in 1998 and drew large crowds.\nThe museum is open."
    assert_reject(parse(RTE, text), "missing_field", "text_a", "text_b")
    assert_reject(
        parse(SVAMP, "Problem: Tom has 7 boxes with 6 pens each. How many pens?"), "missing_field", "answer"
    )


def test_near_duplicate_differing_in_case_punctuation_and_spacing_is_a_duplicate():
    dedup = Deduplicator()
    gens = [
        Generation(text="The plot is thin, but the cast is WONDERFUL!"),
        Generation(text='"the plot is thin   but the cast is wonderful"'),
        Generation(text="The plot is thin, and the cast is dull."),
    ]
    results = parse_batch(SST2, [CHAT] * 3, gens, dedup)
    assert results[0].fields == {"text": "The plot is thin, but the cast is WONDERFUL!"}
    assert_reject(results[1], "duplicate")
    assert results[2].accepted
    assert len(dedup) == 2


def test_copy_of_a_seed_demo_is_a_duplicate():
    demo = SST2.seed_demos[0]["text"]
    assert_reject(parse(SST2, demo.upper()), "duplicate", "seed")


def test_svamp_problems_differing_only_in_answer_are_duplicates():
    question = "Problem: Ann has 12 apples and eats 5 of them. How many are left?"
    gens = [Generation(text=f"{question}\nAnswer: 7"), Generation(text=f"{question}\nAnswer: 8")]
    results = parse_batch(SVAMP, [CHAT, CHAT], gens, Deduplicator())
    assert results[0].fields["answer"] == "7"
    assert_reject(results[1], "duplicate")


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ('Sure! Here\'s a positive movie review:\n\n"The film was a delight from start to finish."', "intro"),
        ("Certainly! Here is a review for you: a warm and funny film.", "intro"),
        ("Here's a positive movie review: A warm and funny film.", "intro"),
        ("I'm sorry, but I can't help with writing that review.", "refusal"),
        ("I cannot generate content like that, but I can suggest something else.", "refusal"),
        ("As an AI language model, I do not have personal opinions about films.", "ai_disclaimer"),
        ("The film is great, but as an AI, I cannot watch movies.", "ai_disclaimer"),
        ("You're an AI assistant that writes movie reviews. The film is great.", "role_echo"),
        ("Assistant: The film is great and the cast is warm.", "role_echo"),
        ("Note: this is a fictional review. The film is great.", "note"),
        ("The film is great (Note: written as an example).", "note"),
        ("Write a positive movie review in one or two sentences.", "instruction_echo"),
        ('{"sentiment": "positive", "text": "great"}', "code"),
        ("[1, 2, 3, 4, 5]", "code"),
        ("```python\nprint('great film')\n```", "code"),
        ("A warm film. Let me know if you need another review!", "closing"),
    ],
)
def test_refusal_and_chatter(text, pattern):
    assert_reject(parse(SST2, text), "refusal", pattern)


def test_rte_refusal_without_tags_is_a_refusal_not_a_missing_field():
    assert_reject(parse(RTE, "I'm sorry, but I cannot generate that kind of content."), "refusal")


def test_refusal_for_binary_control_characters_and_surrogates():
    assert_reject(parse(SST2, "A great film\x00 with\x07 bells."), "refusal", "control")
    assert_reject(parse(SST2, "A great film \ud800 with a lone surrogate."), "refusal")
    assert_reject(parse(SST2, "A great film \ufffd\ufffd decoded badly."), "refusal")


def test_refusal_for_text_with_almost_no_letters():
    assert_reject(parse(SST2, "10/10 5/5 100% 2024 #1 :) :)"), "refusal", "letters")


def test_refusal_for_an_echo_of_the_prompt_instruction():
    echo = "Describe a film you loved in vivid language, mentioning the soundtrack"
    assert_reject(parse(SST2, echo), "refusal", "echoes the prompt")


@pytest.mark.parametrize(
    ("task", "text", "found"),
    [
        (SST2, "This is a positive review of a film I loved.", "positive review"),
        (SST2, "A negative movie review: the plot drags on forever.", "negative movie review"),
        (SST2, "The plot drags on forever. Sentiment: negative", "sentiment:"),
        (SST2, "The plot drags on forever. label: negative", "label:"),
        (SST2, "Negative: the plot drags on forever and nothing happens.", "negative:"),
        (SST2, "The plot drags on and on, and the sentiment is negative.", "sentiment is negative"),
        (SST2, "A warm, funny, lovely film with a great cast [positive]", "[positive]"),
        (
            RTE,
            "Premise: The museum opened in 1998.\nHypothesis: The museum is open (entailment).",
            "(entailment)",
        ),
        (
            RTE,
            "Premise: The museum opened in 1998.\nHypothesis: The museum is open. (not_entailment)",
            "not_entailment",
        ),
        (AG_NEWS, "Stocks rally as inflation cools in Europe (Business)", "(business)"),
    ],
)
def test_label_leak(task, text, found):
    assert_reject(parse(task, text), "label_leak", found)


def test_label_words_in_ordinary_news_are_not_leaks():
    text = "German business sentiment rises. The index rose for a third month, world markets cheered."
    assert parse(AG_NEWS, text).fields == {"text": text}


def test_svamp_is_never_rejected_as_label_leak():
    text = "Problem: Ann wrote 3 positive reviews and 2 negative reviews. Label: how many in all?\nAnswer: 5"
    result = parse(SVAMP, text)
    assert result.reason != "label_leak"


# --- dedup, hashing and result invariants -----------------------------------------------------


def test_normalized_hash_ignores_case_punctuation_and_spacing_only():
    a = normalized_hash({"text": "The cast is wonderful!"})
    assert a == normalized_hash({"text": "  the CAST, is... wonderful "})
    assert a != normalized_hash({"text": "The cast is awful!"})
    assert a != normalized_hash({"question": "The cast is wonderful!"})
    assert re.fullmatch(r"[0-9a-f]{32}", a)


def test_deduplicator_state_resumes():
    first = Deduplicator()
    assert not first.seen({"text": "One fine film."})
    assert first.seen({"text": "one FINE film"})
    assert not first.seen({"text": "Another film."})
    resumed = Deduplicator(first.state())
    assert len(resumed) == 2 and resumed.state() == first.state()
    assert resumed.seen({"text": "ANOTHER film!"})
    assert not resumed.seen({"text": "A third film."})
    assert len(resumed) == 3


def test_parse_batch_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 prompts but 1 generations"):
        parse_batch(SST2, [CHAT, CHAT], [Generation(text="x")], Deduplicator())


def test_parse_result_has_exactly_one_of_fields_or_reason():
    with pytest.raises(ValueError):
        ParseResult(fields=None, reason=None)
    with pytest.raises(ValueError):
        ParseResult(fields={"text": "x"}, reason="empty")
    with pytest.raises(ValueError):
        ParseResult(fields=None, reason="made_up")


def test_chatter_patterns_are_named_compiled_pairs():
    names = {name for name, _ in CHATTER_PATTERNS}
    assert {"refusal", "intro", "closing", "code", "note"} <= names
    assert all(isinstance(p, re.Pattern) for _, p in CHATTER_PATTERNS)


def test_pathological_input_parses_quickly():
    # Runs of numbering ("1. 2) ") once made the tag regex quadratic (seconds at the cap).
    slow = ("1. 2) " * MAX_RAW_CHARS)[: MAX_RAW_CHARS - 10]
    for task in (SST2, RTE, SVAMP):
        start = time.perf_counter()
        parse(task, slow)
        assert time.perf_counter() - start < 1.0


# --- property-based: never raises, always one well-formed outcome -----------------------------

TAG_PIECES = [
    "Premise:", "**Hypothesis:**", "Hypothesis", "Problem:", "Answer:", "Review:", '"Review":', "1.", "-",
    '"', "'", "\n", "\n\n", " ", ":", "**", "{", "}", "[", "```", "<|im_end|>", "=", "19", "1,200", "/",
]  # fmt: skip
binaryish = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x2FF), max_size=200)
surrogates = st.text(alphabet=st.characters(categories=("Cs", "Cc", "Co", "Zs")), max_size=50)
long_text = st.builds(
    lambda piece, n: piece * n, st.text(min_size=1, max_size=12), st.integers(1, 30_000 // 12 + 2000)
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda kids: (
        st.lists(kids, max_size=4)
        | st.dictionaries(st.sampled_from(["Premise", "Review", "text", "Answer", "x"]), kids, max_size=4)
    ),
    max_leaves=10,
).map(json.dumps)
echoes = st.builds(
    lambda head, tail: head + tail,
    st.sampled_from([INSTRUCTION, GOLD_PREFILL.prefill, ZEROGEN.text, SST2.description, RTE.output_format]),
    st.text(max_size=40),
)
tags_only = st.lists(st.sampled_from(TAG_PIECES), max_size=30).map("".join)
mixed = st.lists(st.sampled_from(TAG_PIECES) | st.text(max_size=15), max_size=25).map("".join)
ADVERSARIAL = st.one_of(binaryish, surrogates, long_text, json_values, echoes, tags_only, mixed)
PROMPTS = st.sampled_from([CHAT, GOLD_PREFILL, ZEROGEN])
PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


def check_outcome(task, result):
    assert (result.fields is None) != (result.reason is None)
    if result.reason is not None:
        # "error" is only for failed teacher calls: the parser itself never fails.
        assert result.reason in REJECT_REASONS and result.reason != "error", result.detail
        return
    assert set(result.fields) == set(task.field_names) | ({task.target_key} - {"label"})
    for spec in task.input_fields:
        value = result.fields[spec.name]
        assert isinstance(value, str) and spec.min_chars <= len(value) <= spec.max_chars
        assert value == value.strip() and "\n" not in value
    if task.answer_type == "number":
        assert re.fullmatch(r"-?\d+(\.\d+)?", result.fields[task.target_key])


@pytest.mark.parametrize("task_name", sorted(TASKS))
@PROPERTY_SETTINGS
@given(text=st.text(), prompt=PROMPTS)
def test_parse_generation_never_raises_on_any_text(task_name, text, prompt):
    task = TASKS[task_name]
    check_outcome(task, parse_generation(task, prompt, text))


@pytest.mark.parametrize("task_name", sorted(TASKS))
@PROPERTY_SETTINGS
@given(text=ADVERSARIAL, prompt=PROMPTS)
def test_parse_generation_never_raises_on_adversarial_text(task_name, text, prompt):
    task = TASKS[task_name]
    check_outcome(task, parse_generation(task, prompt, text))
