"""Classify prompts: answered by option scoring (or greedy generation when an engine cannot score),
and read back as labelled records with the teacher's confidence."""

import dataclasses
import math

import pytest

from gold_ray.run.tasks import load_task
from gold_ray.teacher.labelling import OPTIONS_KEY, RECORD_KEY, answer_prompts, read_answer
from gold_ray.teacher.prompts import render_classify_prompt, render_train_prompt
from gold_ray.testing import FakeTeacherEngine
from gold_ray.types import Generation, SamplingParams

SST2 = load_task("sst2")
AG = load_task("ag_news")


def classify(task, text, options=True):
    p = render_classify_prompt(task, {"text": text}, list(task.seed_demos), prompt_style="chat")
    meta = {**p.meta, RECORD_KEY: {"text": text}}
    if options:
        meta[OPTIONS_KEY] = [lb.word for lb in task.labels]
    return dataclasses.replace(p, meta=meta)


class Recorder(FakeTeacherEngine):
    def __init__(self, scores=None, **kw):
        super().__init__(**kw)
        self.scores = scores
        self.generated = []

    def generate(self, prompts, params):
        self.generated.append((list(prompts), params))
        return super().generate(prompts, params)

    def option_logprobs(self, prompts, options):
        if self.scores is None:
            return super().option_logprobs(prompts, options)
        return [list(self.scores) for _ in prompts]


def test_classify_prompts_are_scored_and_generation_prompts_generated():
    engine = Recorder()
    write = render_train_prompt(SST2, "positive", [], style=None, prompt_style="chat")
    prompts = [classify(SST2, "a film that reads as negative to me"), write,
               classify(SST2, "it reads as positive, truly")]
    gens = answer_prompts(engine, prompts, SamplingParams(temperature=1.0, max_new_tokens=40))
    assert [g.text for g in (gens[0], gens[2])] == ["negative", "positive"]
    assert gens[0].output_tokens == 0 and len(gens[0].option_logprobs) == 2
    assert gens[1].option_logprobs is None and gens[1].text
    # Only the generation prompt was generated, with the caller's sampling parameters.
    assert [(len(p), params.temperature) for p, params in engine.generated] == [(1, 1.0)]


def test_unscorable_classify_prompts_fall_back_to_greedy_generation():
    engine = Recorder(scores=[math.nan, math.nan], script=["positive, clearly"])
    gens = answer_prompts(engine, [classify(SST2, "whatever text here")], SamplingParams(max_new_tokens=64))
    (sent, params), = engine.generated
    assert params.temperature == 0.0 and params.max_new_tokens <= 16
    assert gens[0].option_logprobs is None and gens[0].text == "positive, clearly"
    result, confidence = read_answer(SST2, sent[0], gens[0].text, gens[0].option_logprobs)
    assert result.fields == {"text": "whatever text here", "label": "positive"} and math.isnan(confidence)


def test_read_answer_takes_label_and_softmax_confidence_from_the_scores():
    p = classify(AG, "Shares fall as the market slides")
    scores = [math.log(0.1), math.log(0.2), math.log(0.6), math.log(0.1)]  # World, Sports, Business, Sci/Tech
    result, confidence = read_answer(AG, p, "Business", scores)
    assert result.fields == {"text": "Shares fall as the market slides", "label": "Business"}
    assert confidence == pytest.approx(0.6)


@pytest.mark.parametrize("text,label", [("Label: Sci/Tech", "Sci/Tech"), ("sports, then world", "Sports"),
                                        ("WORLD news", "World")])
def test_read_answer_finds_the_first_label_word_in_generated_text(text, label):
    result, _ = read_answer(AG, classify(AG, "some headline text"), text)
    assert result.fields["label"] == label


def test_read_answer_rejects_answers_without_a_label_or_a_record():
    result, _ = read_answer(SST2, classify(SST2, "a text"), "I cannot say")
    assert result.reason == "missing_field" and "no label word" in result.detail
    bare = dataclasses.replace(classify(SST2, "a text"), meta={})
    assert read_answer(SST2, bare, "positive", [0.0, -1.0])[0].reason == "missing_field"


def test_an_engine_failure_on_scoring_falls_back_instead_of_losing_rows():
    class Broken(Recorder):
        def option_logprobs(self, prompts, options):
            raise RuntimeError("scoring unavailable")

    gens = answer_prompts(Broken(script=["negative"]), [classify(SST2, "a text to label")], SamplingParams())
    assert gens == [Generation(text="negative", output_tokens=1)]
