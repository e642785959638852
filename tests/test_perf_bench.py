"""The pure helpers of the performance benchmarks (benchmarks/perf) and their latency-bound test engine.

No timings are asserted: these check the arithmetic, the result layout and the engine's contract.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.perf import (
    common,
    cpu_by_process,
    e2e,
    generation,
    memory,
    scaling,
    scoring,
    startup,
    summary,
    training,
)
from gold_ray.testing import LatencyBoundEngine
from gold_ray.types import Prompt, SamplingParams


def _prompts(n: int) -> list[Prompt]:
    return [Prompt(kind="train", label="positive", messages=({"role": "user", "content": f"review {i}"},),
                   meta={"uid": f"u{i}"}) for i in range(n)]


def test_latency_engine_sleeps_once_per_call_and_answers_every_prompt(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr("gold_ray.testing.time.sleep", slept.append)
    engine = LatencyBoundEngine(latency_s=0.5, per_prompt_s=0.01)
    gens = engine.generate(_prompts(8), SamplingParams())
    assert slept == [pytest.approx(0.58)]
    assert len(gens) == 8 and all(g.error is None and g.text for g in gens)
    assert len({g.text for g in gens}) == 8  # distinct answers: the pipeline's dedup keeps them all
    assert engine.generate([], SamplingParams()) == [] and len(slept) == 1  # nothing to do, no wait


def test_latency_engine_rejects_negative_latency():
    with pytest.raises(ValueError, match="latency_s"):
        LatencyBoundEngine(latency_s=-1)


# --- benchmarks/perf helpers ---------------------------------------------------------------------


def test_summarize_gives_median_and_spread_and_skips_failed_repeats():
    s = common.summarize([2.0, None, 4.0, float("nan"), 3.0])
    assert (s["n"], s["median"], s["min"], s["max"]) == (3, 3.0, 2.0, 4.0)
    assert s["rel_spread"] == pytest.approx(2.0 / 3.0)
    assert common.summarize([5.0])["stdev"] == 0.0
    assert common.summarize([None])["median"] is None


def test_ratio_and_scaling_efficiency():
    assert common.ratio(6.0, 3.0) == 2.0
    assert common.ratio(1.0, 0.0) is None and common.ratio(None, 2.0) is None
    assert common.scaling_efficiency(36.0, 5.0, 8) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="replica"):
        common.scaling_efficiency(1.0, 1.0, 0)
    eff = scaling.efficiencies({1: 10.0, 2: 19.0, 4: None})
    assert eff == {1: 1.0, 2: pytest.approx(0.95), 4: None}


def test_parse_replicas_requires_a_baseline_of_one():
    assert scaling.parse_replicas("1,2,4,8") == [1, 2, 4, 8]
    for bad in ("2,4", "1,x", "", "1,0"):
        with pytest.raises(ValueError, match="--replicas"):
            scaling.parse_replicas(bad)


def _variant(sps: float, tps: float) -> dict:
    return generation.variant_metrics([{"seconds": 10.0, "samples": sps * 10, "output_tokens": tps * 10}])


def test_a_generation_variant_whose_every_sample_failed_is_an_error_not_a_fast_run():
    from gold_ray.types import Generation

    def failing(prompts):
        gens = [Generation(text="", error="TypeError: _generate_batch() takes 4 positional arguments") for _ in prompts]
        return {"output_tokens": 0, "errors": len(prompts), "generations": gens}

    with pytest.raises(RuntimeError, match="every sample of this variant failed, e.g.: TypeError"):
        generation.time_variant(failing, _prompts(4), repeats=1, task="sst2", warmup=0)

    def half(prompts):
        gens = [Generation(text="" if i % 2 else "Review: fine", error="boom" if i % 2 else None, output_tokens=3)
                for i in range(len(prompts))]
        return {"output_tokens": 6, "errors": len(prompts) // 2, "generations": gens}

    m = generation.time_variant(half, _prompts(4), repeats=1, task="sst2", warmup=0)
    assert m["runs"][0]["errors"] == 2  # some failures are recorded, not raised


def test_memory_records_its_command_without_machine_paths():
    import sys

    cmd = [sys.executable, "-m", "benchmarks.perf.e2e", "--out", "/scratch/perf-mem-x", "--run-dir", "runs/m"]
    assert memory.portable_command(cmd, "/scratch/perf-mem-x") == [
        "python", "-m", "benchmarks.perf.e2e", "--out", "<tmp>", "--run-dir", "runs/m"]


def test_generation_ratios_come_from_one_runs_medians():
    variants = {"reference": _variant(0.5, 25.0), "hf": _variant(4.0, 180.0), "vllm": _variant(5.0, 200.0),
                "pipeline": _variant(4.5, 190.0)}
    comp = generation.compare_variants(variants, bound=1000.0, prompt_tokens_per_sample=100.0)
    assert comp["hf"]["samples_ratio_vs_reference"] == pytest.approx(8.0)
    assert comp["pipeline"]["fraction_of_best_engine"] == pytest.approx(0.9)  # best direct engine: vllm
    assert comp["vllm"]["roof_fraction_output"] == pytest.approx(0.2)
    assert comp["vllm"]["roof_fraction_processed"] == pytest.approx((200.0 + 5.0 * 100.0) / 1000.0)
    head = generation.headline(variants, comp)
    assert head["ratio_vs_reference"] == pytest.approx(9.0)
    assert head["teacher_roof_fraction"] == pytest.approx(0.2)
    # Without the reference or a roof the ratios are absent, not invented.
    comp2 = generation.compare_variants({"hf": variants["hf"]}, bound=None, prompt_tokens_per_sample=None)
    assert comp2["hf"]["samples_ratio_vs_reference"] is None and comp2["hf"]["roof_fraction_output"] is None


def test_result_files_round_trip_and_bad_results_are_refused(tmp_path):
    res = common.new_result("demo-bench", "python -m x --quick", {"quick": True})
    res["metrics"] = {"a": common.summarize([1.0, 2.0])}
    res["headline"] = {"some_ratio": 1.5}
    res["notes"].append("a note")
    jp, mp = common.write_result(res, common.markdown_table(["k", "v"], [["x", 1.23456]]), tmp_path)
    back = common.read_result(jp)
    assert back["headline"] == {"some_ratio": 1.5} and back["machine"]["logical_cpus"]
    text = mp.read_text()
    assert "python -m x --quick" in text and "| x | 1.23 |" in text and "a note" in text
    bad = dict(res, headline={"x": "fast"})
    with pytest.raises(ValueError, match="headline 'x'"):
        common.validate_result(bad)
    with pytest.raises(ValueError, match="misses keys"):
        common.validate_result({k: v for k, v in res.items() if k != "machine"})
    with pytest.raises(ValueError, match="cells"):
        common.markdown_table(["a", "b"], [[1]])


def test_summary_has_every_required_key_and_says_how_far_off_a_target_is(tmp_path):
    gen = common.new_result("generation", "cmd", {})
    gen["headline"] = {"ratio_vs_reference": 7.5, "pipeline_fraction_of_engine": 0.95}
    s = summary.build_summary({"generation": gen})
    assert set(summary.REQUIRED) <= set(s) and s["peak_rss_gb"] is None
    assert s["targets"]["ratio_vs_reference"] == {"target": 15.0, "op": ">=", "value": 7.5, "met": False,
                                                  "shortfall": pytest.approx(0.5)}
    assert s["targets"]["pipeline_fraction_of_engine"]["met"] is True
    assert s["targets"]["scaling_efficiency_8"]["met"] is None
    common.write_result(gen, "", tmp_path)
    assert summary.main(["--out", str(tmp_path)]) == 0
    assert "no (50% short)" in (tmp_path / "summary.md").read_text()


def test_e2e_reads_stage_times_from_run_metrics():
    metrics = {"iterations": [
        {"iteration": 0, "generate": {"seconds": 10.0, "requested": 8, "output_tokens": 300},
         "train": {"seconds": 4.0}, "probe": {"seconds": 3.0, "score_seconds": 0.5, "requested": 2,
                                               "output_tokens": 70}},
        {"iteration": 1, "generate": {"seconds": 12.0, "requested": 8}, "train": {"seconds": 5.0}},
    ], "final": {"seconds": 9.0, "fit": {"seconds": 6.0}}}
    rows = e2e.stage_rows(metrics)
    assert rows[0] == {"iteration": 0, "generate_s": 10.0, "probe_s": 3.0, "score_s": 0.5, "train_s": 4.0,
                       "final_s": None, "samples": 10, "output_tokens": 370}
    assert rows[1]["probe_s"] is None and rows[-1]["final_s"] == 9.0 and rows[-1]["train_s"] == 6.0
    walls = e2e.event_walls([("generate", 0, 5.0), ("train", 0, 7.0), ("generate", 1, 10.0), ("final", 1, 16.0)],
                            t_start=1.0)
    assert walls == {"0": {"generate": 4.0, "train": 2.0}, "1": {"generate": 3.0}, "final": {"final": 6.0}}
    its = e2e.iteration_summary(rows, walls)
    assert its["recorded_per_iteration_s"] == [17.0, 17.0] and its["wall_median_s"] == pytest.approx(4.5)


def test_scoring_helpers():
    assert scoring.pool_cpus(actors=2, num_cpus=0.5, logical_cpus=2) == 2  # Ray gives each actor one thread
    assert scoring.pool_cpus(actors=4, num_cpus=2, logical_cpus=2) == 2  # never more than the machine has
    assert scoring.steady_rate([1.0, 1.0, 3.0, 5.0], {1.0: 64, 3.0: 64, 5.0: 32}) == pytest.approx(24.0)
    assert scoring.steady_rate([2.0], {2.0: 10}) is None


def test_memory_tracker_keeps_the_peak_and_samples_a_real_process_tree():
    import os

    t = memory.PeakTracker()
    for rss, pss in ((100, 80), (300, 200), (200, 250)):
        t.add({"rss": rss, "pss": pss, "processes": 3, "top": []})
    assert t.peak_rss["rss"] == 300 and t.peak_pss == 250 and t.samples == 3
    sample = memory.tree_memory(os.getpid(), pss=False)
    assert sample["rss"] > 0 and sample["processes"] >= 1 and sample["pss"] is None
    assert memory.tree_memory(2**22 + 12345, pss=False) is None  # no such process


def test_e2e_runtimes_are_checked_and_run_in_a_fixed_order():
    assert e2e.parse_runtimes("ray, authors") == ["authors", "ray"]
    assert e2e.parse_runtimes("authors,local,ray") == list(e2e.RUNTIMES)
    for bad in ("", "ray,spark"):
        with pytest.raises(ValueError, match="--runtimes"):
            e2e.parse_runtimes(bad)
    assert e2e.runtime_dirs("runs/x", ["local", "ray"]) == {"local": Path("runs/x/local"),
                                                            "ray": Path("runs/x/ray")}


def test_e2e_authors_loop_draws_demonstrations_per_prompt_and_the_others_run_the_default():
    import argparse

    args = argparse.Namespace(config="demo", set=[])
    per_set = {name: common.load_run_config(args, e2e.runtime_overrides(name)).teacher.prompts_per_demo_set
               for name in e2e.RUNTIMES}
    assert per_set["authors"] == 1
    assert per_set["local"] == per_set["ray"] == common.load_run_config(args).teacher.prompts_per_demo_set > 1


def test_e2e_stops_before_running_when_the_evaluation_set_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("GOLD_RAY_DATA", raising=False)
    ran = []
    monkeypatch.setattr(e2e, "run_all", lambda *a, **k: ran.append(a))
    with pytest.raises(SystemExit):
        e2e.main(["--run-demo", "--run-dir", str(tmp_path / "runs")])
    assert not ran
    assert "the demo's evaluation set" in capsys.readouterr().err


def test_e2e_compares_runtimes_side_by_side():
    runs = {
        "authors": {"start_s": 0.0, "total_s": 600.0,
                    "event_walls": {"0": {"generate": 500.0, "train": 40.0}, "final": {"final": 60.0}}},
        "local": {"start_s": 0.0, "total_s": 100.0,
                  "event_walls": {"0": {"generate": 50.0, "train": 40.0}, "final": {"final": 10.0}}},
        "ray": {"start_s": 5.0, "total_s": 110.0,
                "event_walls": {"0": {"train": 42.0, "generate": 53.0}, "final": {"final": 10.0}}},
    }
    runs["authors"]["event_walls"]["0"]["feedback"] = 0.01
    runs["ray"]["event_walls"]["0"]["feedback"] = 0.5
    tiny = e2e.compare_runtimes(runs)["rows"][2]
    assert tiny["stage"] == "iteration 0 feedback" and tiny["authors_over_ray"] is None  # too short to compare
    for r in ("authors", "ray"):
        del runs[r]["event_walls"]["0"]["feedback"]
    comp = e2e.compare_runtimes(runs)
    assert comp["runtimes"] == ["authors", "local", "ray"]
    assert [r["stage"] for r in comp["rows"]] == ["iteration 0 generate", "iteration 0 train", "final",
                                                  "Ray start", "whole run"]
    whole = comp["rows"][-1]
    assert (whole["authors"], whole["local"], whole["ray"]) == (600.0, 100.0, 110.0)
    assert comp["ray_over_local"] == pytest.approx(1.1) == whole["ray_over_local"]
    assert comp["speedup_vs_authors_loop"] == pytest.approx(600.0 / 110.0)
    assert comp["rows"][0]["authors_over_ray"] == pytest.approx(500.0 / 53.0)
    assert comp["rows"][3]["stage"] == "Ray start" and comp["rows"][3]["local"] is None
    assert comp["rows"][3]["ray"] == 5.0 and comp["rows"][3]["ray_over_local"] is None
    assert "| whole run | 600 | 100 | 110 | 1.1 | 5.45 |" in e2e.comparison_table(comp)
    # A runtime that did not run has no column, and the ratios that need it are absent, not invented.
    only = e2e.compare_runtimes({"ray": runs["ray"]})
    assert only["runtimes"] == ["ray"] and only["ray_over_local"] is None
    assert only["speedup_vs_authors_loop"] is None and "authors" not in only["rows"][-1]


def test_authors_engine_calls_once_per_prompt_and_cuts_at_stop_strings():
    from types import SimpleNamespace

    from gold_ray.types import Generation

    calls: list[int] = []

    def runner(prompts):
        calls.append(len(prompts))
        gens = [Generation(text=f"answer {i}\n\nmore", output_tokens=7) for i in range(len(prompts))]
        gens[-1] = Generation(text="", error="boom")
        return {"generations": gens}

    scored: list[int] = []

    class Scorer(LatencyBoundEngine):
        def option_logprobs(self, prompts, options):
            scored.append(len(prompts))
            return [[-1.0] * len(options) for _ in prompts]

        def close(self):
            scored.append(-1)

    cfg = SimpleNamespace(teacher=SimpleNamespace(dtype="auto", max_new_tokens=16, batch_size=4,
                                                  trust_remote_code=False), seed=0)
    prompts = [Prompt(kind="train", label="positive", messages=({"role": "user", "content": "x"},),
                      stop=("\n\n",)) for _ in range(3)]
    engine = e2e.AuthorsLoopEngine(cfg, "unused", device="cpu", runner=runner,
                                   scorer_factory=lambda: Scorer(latency_s=0))
    gens = engine.generate(prompts, SamplingParams())
    assert calls == [3] and [g.text for g in gens] == ["answer 0", "answer 1", ""]
    assert gens[0].output_tokens == 7 and gens[2].error == "boom"  # tokens the pipeline wrote, errors kept
    assert scored == []  # the scorer is built on first use only
    assert engine.option_logprobs(prompts[:2], ["positive", "negative"]) == [[-1.0, -1.0]] * 2
    engine.close()
    assert scored == [2, -1]


def test_summary_ceiling_targets_say_how_far_over():
    assert summary.compare_target(1.3, "<=", 1.15) == {"target": 1.15, "op": "<=", "value": 1.3, "met": False,
                                                      "shortfall": pytest.approx(1.3 / 1.15 - 1)}
    assert summary.compare_target(1.0, "<=", 1.15)["met"] is True
    with pytest.raises(ValueError, match="operator"):
        summary.compare_target(1.0, "==", 1.0)


def test_summary_picks_up_the_e2e_runtime_ratios(tmp_path):
    res = common.new_result("e2e", "cmd", {})
    res["headline"] = {"e2e_iteration_s": 30.0, "e2e_demo_s": 120.0, "e2e_ray_over_local": 1.2,
                       "e2e_speedup_vs_authors_loop": 6.0}
    s = summary.build_summary({"e2e": res})
    assert s["e2e_demo_s"] == 120.0 and s["e2e_ray_over_local"] == 1.2
    assert s["targets"]["e2e_ray_over_local"]["met"] is False
    assert s["targets"]["e2e_speedup_vs_authors_loop"]["met"] is True
    assert summary.build_summary({})["e2e_speedup_vs_authors_loop"] is None  # required, null when not run
    common.write_result(res, "", tmp_path)
    assert summary.main(["--out", str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    assert "| e2e_ray_over_local | 1.2 | <= 1.15 | no (4% over) |" in text
    assert "| e2e_speedup_vs_authors_loop | 6 | >= 5 | yes |" in text


def test_training_records_come_from_seed_demos_and_are_all_different():
    from gold_ray.run.tasks import load_task

    task = load_task("sst2")
    recs = training.training_records(task, 3 * len(task.seed_demos))
    assert len(recs) == 3 * len(task.seed_demos) and len({r["text"] for r in recs}) == len(recs)
    assert {r[task.target_key] for r in recs} <= set(task.label_names)


def test_summary_holds_the_ray_training_fixed_cost_against_its_ceiling():
    res = common.new_result("training", "cmd", {})
    res["headline"] = {"train_fixed_cost_ray_s": 7.5, "train_group_start_s": 12.0}
    s = summary.build_summary({"training": res})
    assert s["targets"]["train_fixed_cost_ray_s"] == {"target": 5.0, "op": "<=", "value": 7.5, "met": False,
                                                      "shortfall": 0.5}
    assert summary.build_summary({})["train_fixed_cost_ray_s"] is None


def test_precision_pairs_each_variant_with_the_loop_fit_of_the_same_run():
    from benchmarks.perf.precision import summary_of

    def row(run, variant, s_per_step, test, val):
        return {"run": run, "variant": variant, "seconds_per_step": s_per_step, "test_accuracy": test,
                "val_accuracy": val}

    rows = [row("a", "loop", 1.0, 0.70, 0.80), row("a", "bfloat16", 0.5, 0.72, 0.80),
            row("b", "loop", 0.9, 0.60, 0.70), row("b", "bfloat16", 0.3, 0.59, 0.72),
            row("c", "bfloat16", 0.1, 0.99, 0.99)]  # no loop fit of c: not paired, not counted
    s = summary_of(rows)["bfloat16"]
    assert s["runs"] == 2 and s["speedup_vs_loop_median"] == pytest.approx((2.0 + 3.0) / 2)
    assert s["test_accuracy_diff_mean"] == pytest.approx(0.005)
    assert (s["test_accuracy_diff_min"], s["test_accuracy_diff_max"]) == pytest.approx((-0.01, 0.02))
    assert s["val_accuracy_diff_mean"] == pytest.approx(0.01)
    assert "float32" not in summary_of(rows)


def test_precision_loop_variant_unfuses_adamw_only_inside_its_block():
    from benchmarks.perf.precision import _per_tensor_adamw
    from gold_ray.student.training import adamw

    model = torch.nn.Linear(3, 2)
    with _per_tensor_adamw():
        assert not adamw(model, 1e-3, 0.01).defaults["fused"]
    assert adamw(model, 1e-3, 0.01).defaults["fused"]


def test_precision_records_its_run_folders_without_machine_paths():
    from benchmarks.perf.precision import portable_runs

    assert portable_runs("/home/me/runs/quality/sst2-gold-s0-n1000,rel/rte-gold-s0-n1000") == (
        "<RUNS>/sst2-gold-s0-n1000,<RUNS>/rte-gold-s0-n1000")


def test_cpu_by_process_names_a_process_by_its_ray_title_or_its_program():
    kind = cpu_by_process.process_kind
    assert kind("ray::ServeReplica:teacher-1a2b:TeacherDeployment.handle_request") == "ray::ServeReplica"
    assert kind("ray::TrainController.run") == "ray::TrainController"
    assert kind("ray::IDLE") == "ray::IDLE"
    assert kind("/venv/bin/python -u /venv/lib/ray/_private/log_monitor.py --session-dir=x") == "log_monitor.py"
    assert kind("/venv/bin/python -m benchmarks.perf.e2e --run-demo") == "benchmarks.perf.e2e"
    assert kind("python3 -c print(1)") == "python -c"
    assert kind("/venv/lib/ray/core/src/ray/raylet/raylet --raylet_socket_name=x") == "raylet"
    assert kind("anything at all", is_root=True) == "command"
    assert kind("") == "(no title)"


def test_cpu_by_process_splits_start_up_from_steady_state_and_windows_the_cores():
    Proc = cpu_by_process.Proc
    # A worker that burns 3 CPU-s in its first 10 s, then idles at 0.1 core for 20 s; a second of its kind idles.
    busy = Proc(1, "ray::WarmScorer", 0.0, [(0.0, 0.5), (10.0, 3.0), (20.0, 4.0), (30.0, 5.0)])
    idle = Proc(2, "ray::WarmScorer.score", 10.0, [(10.0, 0.0), (40.0, 0.3)])
    root = Proc(3, "gold-ray distill demo", 0.0, [(0.0, 0.0), (40.0, 1.0)])
    rows = {r["kind"]: r for r in cpu_by_process.kinds_table({1: busy, 2: idle, 3: root}, root=3, startup_s=10.0)}
    scorers = rows["ray::WarmScorer"]
    assert scorers["processes"] == 2
    assert scorers["startup_cpu_s"] == pytest.approx(3.0 + 0.0)
    assert scorers["steady_cpu_s"] == pytest.approx(2.0 + 0.3)
    assert scorers["steady_cores_per_process"] == pytest.approx(2.3 / (20.0 + 20.0))
    assert rows["command"]["cpu_s"] == pytest.approx(1.0)
    machine = [(0.0, 100.0), (10.0, 110.0), (20.0, 130.0), (30.0, 150.0), (40.0, 160.0)]
    line = cpu_by_process.timeline({1: busy}, machine, window_s=10.0)
    assert [w["command_cores"] for w in line] == pytest.approx([0.25, 0.1, 0.1, 0.0])  # it was gone after 30 s
    assert [w["machine_cores"] for w in line] == pytest.approx([1.0, 2.0, 2.0, 1.0])


def test_cpu_by_process_counts_a_real_child_and_writes_its_result(tmp_path):
    import json
    import sys

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {burn!r}], check=True)"
    rc = cpu_by_process.main(["--name", "test", "--out", str(tmp_path), "--interval", "0.05", "--startup-s", "0.2",
                              "--", sys.executable, "-c", parent])
    assert rc == 0
    result = json.loads((tmp_path / "cpu-test.json").read_text())
    kinds = {r["kind"]: r for r in result["metrics"]["kinds"]}
    assert set(kinds) == {"command", "python -c"}
    assert 0.3 <= kinds["python -c"]["cpu_s"] <= 1.5  # the child's 0.6 s, less what fell after its last sample
    assert result["metrics"]["cpu_s"] >= kinds["python -c"]["cpu_s"]  # the headline is rounded: not that one
    assert "ray::" not in (tmp_path / "cpu-test.md").read_text()  # nothing outside the command's tree


def _event(name: str, launched: float, after_s: float, **fields) -> str:
    import json
    from datetime import UTC, datetime

    when = datetime.fromtimestamp(launched + after_s, UTC).isoformat(timespec="milliseconds")
    return json.dumps({"event": name, "time": when, **fields})


def test_startup_marks_the_first_of_each_event_from_launch():
    lines = [_event("start", 100.0, 2.0), "Ray's banner, not an event", _event("plan", 100.0, 30.0),
             _event("progress", 100.0, 31.0, stage="generate", iteration=0), _event("generate", 100.0, 50.0, iteration=0),
             _event("train", 100.0, 80.0, iteration=0), _event("generate", 100.0, 99.0, iteration=1),
             _event("plan", 100.0, 120.0)]  # a resumed run plans again: the first one counts
    assert startup.event_marks(lines, 100.0) == pytest.approx({"start": 2.0, "plan": 30.0, "generate0": 50.0,
                                                               "train0": 80.0})


def test_startup_stops_a_child_after_its_first_training_and_reads_its_marks(tmp_path):
    import sys
    import time

    # A stand-in for `gold-ray distill --json-logs`: its events, then more work until Ctrl-C.
    script = tmp_path / "run.py"
    script.write_text(
        "import json, sys, time\n"
        "from datetime import UTC, datetime\n"
        "def event(name, **kw):\n"
        "    print(json.dumps({'event': name, 'time': datetime.now(UTC).isoformat(), **kw}), flush=True)\n"
        "event('start'); event('plan'); event('generate', iteration=0); event('train', iteration=0)\n"
        "try:\n"
        "    time.sleep(60)\n"
        "except KeyboardInterrupt:\n"
        "    print('stopped', file=sys.stderr); sys.exit(130)\n")
    began = time.monotonic()
    marks = startup.time_setup([sys.executable, str(script)], {})
    assert time.monotonic() - began < 30  # stopped, not left to sleep its minute
    assert list(marks) == list(startup.MARKS) and all(0 <= v < 30 for v in marks.values())
    # A run that ends before its first training is an error naming why.
    script.write_text("import sys; print('no task', file=sys.stderr); sys.exit(2)\n")
    with pytest.raises(SystemExit, match="exited 2 before iteration 0's train stage ended:\n.*no task"):
        startup.time_setup([sys.executable, str(script)], {})
    # One that hangs before it is killed at the deadline, not waited on for ever.
    script.write_text("import time; print('{}', flush=True); time.sleep(60)\n")
    began = time.monotonic()
    with pytest.raises(SystemExit, match="exited -9 before"):
        startup.time_setup([sys.executable, str(script)], {}, timeout_s=2.0)
    assert time.monotonic() - began < 30


def test_startup_builds_the_users_command_for_both_runtimes(tmp_path):
    import argparse

    args = argparse.Namespace(config="demo", samples=64, iterations=2, set=["seed=1"])
    ray_cmd = startup.distill_command("ray", tmp_path, args)
    local_cmd = startup.distill_command("local", tmp_path, args)
    assert ray_cmd[1:4] == ["-m", "gold_ray.cli", "distill"] and "--json-logs" in ray_cmd and "--local" not in ray_cmd
    assert local_cmd == [*ray_cmd[:ray_cmd.index(str(tmp_path / "ray"))], str(tmp_path / "local"),
                         *ray_cmd[ray_cmd.index(str(tmp_path / "ray")) + 1:], "--local"]
    assert ray_cmd[-2:] == ["--set", "seed=1"]


def test_startup_refuses_a_runtime_it_does_not_know(capsys):
    with pytest.raises(SystemExit):
        startup.main(["--runtimes", "rays"])
    assert "--runtimes: 'rays' names none or other than local, ray" in capsys.readouterr().err
