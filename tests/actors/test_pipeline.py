"""The generation pipeline: teacher deployment -> parse -> scoring pool -> Parquet, on a local cluster."""

import functools
import math
import os
import subprocess
import sys

import pytest
import ray

from actors.pipeline import generate_iteration, generation_dataset, parse_row, prompt_rows, start_caller
from actors.teacher import build_teacher_app, default_sampling
from gold_ray.run.store import read_parts
from gold_ray.teacher.parsing import Deduplicator, normalized_hash
from gold_ray.testing import FakeTeacherEngine
from tests.raykit import CrashOnceEngine, GatedEngine, chat_prompts, make_cfg

GOOD_TEXTS = [
    "A gentle, funny film about two brothers on a road trip.",
    "The soundtrack carries scenes that the script leaves empty.",
    "Slow, muddled and much too long for such a thin story.",
]


# --- no cluster needed ----------------------------------------------------------------------------


def test_the_code_that_forwards_teacher_calls_loads_no_torch():
    # The run's caller actor and Ray Data's forwarding tasks import these modules and run no
    # model: importing torch there cost each process about 1.7 CPU-seconds and 180 MB.
    code = "import sys, actors.pipeline, actors.teacher, actors.scoring; sys.exit('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr or "torch was imported"


def test_parse_row_turns_answers_and_errors_into_records(sst2):
    row = prompt_rows(chat_prompts(1))[0]
    ok = parse_row(
        {
            **row,
            "teacher_text": GOOD_TEXTS[0],
            "teacher_tokens": 11,
            "teacher_error": "",
            "generated_at": 5.0,
        },
        task=sst2,
    )
    assert ok["reject_reason"] == "" and ok["text"] == GOOD_TEXTS[0] and ok["label"] == "positive"
    assert ok["teacher_failed"] is False and ok["output_tokens"] == 11

    engine_error = parse_row({**row, "teacher_text": "", "teacher_error": "CUDA out of memory"}, task=sst2)
    serve_error = parse_row({**row, "teacher_text": "", "teacher_error": "TimeoutError: slow"}, task=sst2)
    for bad, text in ((engine_error, "CUDA out of memory"), (serve_error, "TimeoutError: slow")):
        assert bad["reject_reason"] == "error" and bad["reject_detail"] == text
        assert bad["teacher_failed"] is True and bad["text"] == ""

    rejected = parse_row(
        {**row, "teacher_text": "I'm sorry, I cannot write that review.", "teacher_error": ""}, task=sst2
    )
    assert rejected["reject_reason"] == "refusal" and rejected["teacher_failed"] is False


def test_no_prompts_writes_an_empty_part_without_touching_ray(sst2, tmp_path):
    out = tmp_path / "empty.parquet"
    stats = generate_iteration([], make_cfg(), sst2, "no-such-app", None, out)
    assert out.exists() and read_parts([out]) == []
    assert stats["requested"] == 0 and stats["attempts"] == 0


# --- on the Ray cluster ---------------------------------------------------------------------------


@pytest.mark.ray
def test_unknown_teacher_app_fails_fast(serve_port, sst2, tmp_path):
    with pytest.raises(ValueError, match="no Serve application 'missing'"):
        generate_iteration(chat_prompts(2), make_cfg(), sst2, "missing", None, tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.ray
def test_scoring_streams_alongside_generation(serve_apps, student_ckpt, sst2, tmp_path):
    cfg = make_cfg(teacher={"batch_size": 2})
    gate = tmp_path / "gate"
    serve_apps(build_teacher_app(cfg, functools.partial(GatedEngine, gate=str(gate), hold_after=8)), "gated")
    caller = start_caller("gated", sst2)
    ds = generation_dataset(
        prompt_rows(chat_prompts(16)),
        cfg,
        sst2,
        caller,
        student_ckpt,
        default_sampling(cfg.teacher),
        request_batch_size=2,
    )
    rows = []
    try:
        for row in ds.iter_rows():
            rows.append(row)
            # The engine holds every prompt after the 8th until the first scored row reaches us.
            gate.touch()
    finally:
        ray.kill(caller)
    assert len(rows) == 16
    first_scored = min(r["scored_at"] for r in rows if math.isfinite(r["score"]))
    last_generated = max(r["generated_at"] for r in rows)
    assert first_scored < last_generated
    assert all(math.isfinite(r["score"]) for r in rows if not r["reject_reason"])


NO_HEALTH_PROBE = {"serve": {"health_check_period_s": 3600.0}}
"""For tests that count the fake engine's calls (every n-th fails): a replica idle for a health check
period answers a one-token probe, which would take a call number (seen on a loaded 2-core CI box)."""


@pytest.mark.ray
def test_iteration_writes_every_row_with_scores_and_errors(serve_apps, student_ckpt, sst2, tmp_path):
    cfg = make_cfg(teacher={"max_retries": 0, **NO_HEALTH_PROBE})
    handle = serve_apps(build_teacher_app(cfg, functools.partial(FakeTeacherEngine, fail_every=4)), "failing")
    out = tmp_path / "data" / "train-it003.parquet"
    stats = generate_iteration(chat_prompts(12), cfg, sst2, handle, student_ckpt, out, iteration=3)

    records = read_parts([out])
    assert [r["id"] for r in records] == [f"it003-train-{i:05d}" for i in range(12)]
    errors = [r for r in records if r["reject_reason"] == "error"]
    assert len(errors) == 3  # every 4th engine call fails, and none is retried
    assert all("injected failure" in r["reject_detail"] and r["raw_text"] == "" for r in errors)
    accepted = [r for r in records if r["reject_reason"] is None]
    assert len(accepted) == 9
    assert all(
        math.isfinite(r["score"]) and r["text"] and r["label"] == r["requested_label"] for r in accepted
    )
    assert all(math.isnan(r["score"]) for r in errors)
    assert stats["requested"] == 12 and stats["accepted"] == 9 and stats["scored"] == 9
    assert stats["rejected_by_reason"] == {"error": 3} and stats["attempts"] == 1
    assert isinstance(stats["streamed"], bool) and stats["scorer_actors"] == 1
    assert stats["output_tokens"] == sum(r["output_tokens"] for r in records) > 0
    assert not [p for p in out.parent.iterdir() if p != out]  # no temp file left behind


@pytest.mark.ray
def test_a_runs_caller_serves_every_generate_stage_and_outlives_them(serve_apps, sst2, tmp_path):
    # A run starts one caller and passes it to every stage; a stage must not stop it.
    cfg = make_cfg()
    serve_apps(build_teacher_app(cfg, functools.partial(FakeTeacherEngine)), "kept-caller")
    caller = start_caller("kept-caller", sst2)
    try:
        pid = ray.get(caller.__ray_call__.remote(lambda self: os.getpid()))
        for i in range(2):
            stats = generate_iteration(chat_prompts(6), cfg, sst2, "kept-caller", None, tmp_path / f"it{i}.parquet",
                                       iteration=i, caller=caller)
            assert stats["requested"] == 6 and stats["accepted"] == 6
        assert ray.get(caller.__ray_call__.remote(lambda self: os.getpid())) == pid  # the same process, alive
    finally:
        ray.kill(caller)


@pytest.mark.ray
def test_progress_counts_whole_teacher_batches(serve_apps, sst2, tmp_path):
    # A batch's rows arrive together: counted row by row, the first row of a batch would set the
    # stage's rate (one sample in the time of a whole batch) and its time left.
    cfg = make_cfg()
    serve_apps(build_teacher_app(cfg, functools.partial(FakeTeacherEngine)), "counted")
    seen = []
    generate_iteration(chat_prompts(12), cfg, sst2, "counted", None, tmp_path / "out.parquet", request_batch_size=4,
                       on_progress=lambda unit, done, total, **counts: seen.append((unit, done, total)))
    assert seen[0] == ("samples", 0, 12) and seen[-1] == ("samples", 12, 12)
    assert all(done % 4 == 0 for _, done, _ in seen), seen


@pytest.mark.ray
def test_failed_requests_are_retried(serve_apps, sst2, tmp_path):
    # The retry delay comes from the config.
    cfg = make_cfg(teacher={"max_retries": 1, "retry_backoff_s": 0.1, **NO_HEALTH_PROBE})
    serve_apps(build_teacher_app(cfg, functools.partial(FakeTeacherEngine, fail_every=4)), "flaky")
    stats = generate_iteration(chat_prompts(12), cfg, sst2, "flaky", None, tmp_path / "out.parquet")
    # Calls 4, 8 and 12 fail; their retries are calls 13 to 15, which succeed.
    assert stats["attempts"] == 2 and stats["retried"] == 3
    assert stats["accepted"] == 12 and stats["rejected_by_reason"] == {}
    assert stats["scored"] == 0 and stats["streamed"] is None


@pytest.mark.ray
def test_duplicates_are_caught_across_the_iteration_and_earlier_ones(serve_apps, sst2, tmp_path):
    cfg = make_cfg()
    serve_apps(build_teacher_app(cfg, functools.partial(FakeTeacherEngine, script=GOOD_TEXTS)), "repeats")
    dedup = Deduplicator([normalized_hash({"text": GOOD_TEXTS[1].upper()})])  # seen in an earlier iteration
    stats = generate_iteration(
        chat_prompts(6), cfg, sst2, "repeats", None, tmp_path / "out.parquet", dedup=dedup
    )

    records = read_parts([tmp_path / "out.parquet"])
    accepted = sorted(r["text"] for r in records if r["reject_reason"] is None)
    assert accepted == sorted([GOOD_TEXTS[0], GOOD_TEXTS[2]])  # each text twice; one known before
    assert stats["rejected_by_reason"] == {"duplicate": 4}
    # The first occurrence in prompt order is the one kept.
    first = {t: min(r["id"] for r in records if r["raw_text"] == t) for t in GOOD_TEXTS}
    assert {r["id"] for r in records if r["reject_reason"] is None} == {
        first[GOOD_TEXTS[0]],
        first[GOOD_TEXTS[2]],
    }
    assert len(dedup) == 3


@pytest.mark.ray
@pytest.mark.slow
def test_a_replica_crash_mid_iteration_is_retried(serve_apps, sst2, tmp_path):
    cfg = make_cfg(teacher={"max_retries": 2})
    marker = tmp_path / "crashed"
    serve_apps(build_teacher_app(cfg, functools.partial(CrashOnceEngine, marker=str(marker))), "crashy")
    stats = generate_iteration(
        chat_prompts(8), cfg, sst2, "crashy", None, tmp_path / "out.parquet", retry_backoff_s=0.5
    )
    assert marker.exists()  # the replica did die
    assert stats["accepted"] == 8 and stats["rejected_by_reason"] == {}
    assert stats["attempts"] >= 2


@pytest.mark.ray
def test_iterations_given_the_run_s_scorer_pool_score_on_one_warm_actor_with_each_checkpoint(
        serve_apps, student_ckpt, tiny_student, sst2, tmp_path):
    import ray

    from actors.scoring import ScorerPool
    from gold_ray.student.model import ClassifierStudent, load_student

    cfg = make_cfg()
    handle = serve_apps(build_teacher_app(cfg, FakeTeacherEngine), "warm-scorers")
    other = tmp_path / "other-ckpt"
    ClassifierStudent(sst2, tiny_student, device="cpu", seed=1).save(other)
    seen = []
    with ScorerPool(cfg, sst2) as pool:
        for i, ckpt in enumerate((student_ckpt, str(other))):
            out = tmp_path / f"train-it{i:03d}.parquet"
            stats = generate_iteration(chat_prompts(6), cfg, sst2, handle, ckpt, out, iteration=i, scorer_pool=pool)
            [actor] = pool.actors
            seen.append(ray.get(actor.describe.remote()))
            accepted = [r for r in read_parts([out]) if r["reject_reason"] is None]
            assert stats["scored"] == len(accepted) > 0 and stats["scorer_actors"] == 1
            expected = load_student(ckpt, sst2).ood_scores(accepted)
            assert [r["score"] for r in accepted] == pytest.approx(list(expected), rel=1e-5)
    assert [s["version"] for s in seen] == [1, 2]
    assert seen[0]["identity"] == seen[1]["identity"], "the second iteration started no scorer"
