"""The ``gold-ray`` command line.

Commands::

    gold-ray distill CONFIG [--set key=value ...] [--resume] [--overwrite] [--fork-from RUN_DIR] [--local]
                     [--quiet|--json-logs] [--verbose]
    gold-ray compare CONFIG --strategies gold,zerogen --seeds N [--reference NAME] [--output DIR] [--local]
                     [--quiet|--json-logs]
    gold-ray report RUN_DIR [RUN_B] [--out FILE]
    gold-ray predict RUN_DIR TEXT... | --file input.jsonl [--output FILE]
    gold-ray serve CONFIG [--set key=value ...]
    gold-ray tasks list
    gold-ray tasks validate FILE...
    gold-ray config show [CONFIG] [--set key=value ...]
    gold-ray models list
    gold-ray models prepare [REF ...]
    gold-ray submit CONFIG --address URL [--follow] [--set key=value ...]
    gold-ray jobs status|logs|stop JOB_ID --address URL

CONFIG is a YAML file or the name of a shipped config (``demo``, ``tiny``).

Exit status: 0 on success; 2 for bad input (one line on stderr naming the key, field, file or
argument); 1 for an internal error (a bug), whose traceback goes to the run's ``logs/gold-ray.log``
when there is a run directory, and to stderr with ``gold-ray --debug``.

``distill`` and ``compare`` print gold-ray's own lines; other libraries' log records go to
``RUN_DIR/logs/libraries.log`` and their progress bars are off, unless ``--verbose``
(:mod:`gold_ray.reporting.logs`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from gold_ray.config import RunConfig
from gold_ray.entry import SHIPPED_CONFIG_DIR, config_path, load_run_config, report_failure, summary_text
from gold_ray.errors import InputError, UserError
from gold_ray.run.tasks import TaskFileError, load_task, shipped_tasks

# SHIPPED_CONFIG_DIR and config_path live in gold_ray.entry; callers that import them from the CLI
# (gold_ray.distill, the benchmarks, tests) keep working.
__all__ = ["SHIPPED_CONFIG_DIR", "build_parser", "config_path", "main"]


def _load(args: argparse.Namespace) -> RunConfig:
    return load_run_config(config_path(args.config), args.set, overwrite=getattr(args, "overwrite", False),
                           output_dir=getattr(args, "output", None), fork_from=getattr(args, "fork_from", None))


def _note_run_dir(args: argparse.Namespace, run_dir: str | Path) -> None:
    # Where main() writes the traceback of an internal error (RUN_DIR/logs/gold-ray.log).
    args.known_run_dir = Path(run_dir)


def _task_words(cfg: RunConfig) -> str:
    """The task as the start line names it: its own name, and the file it was read from when one was."""
    task = load_task(cfg.task.name)
    return task.name if task.name == cfg.task.name else f"{task.name} ({cfg.task.name})"


def _verbose(args: argparse.Namespace) -> bool:
    # The Ray side (connecting, the driver actor, the workers) reads it from the environment.
    if args.verbose:
        from gold_ray.reporting.logs import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"
    return bool(args.verbose)


def cmd_distill(args: argparse.Namespace) -> int:
    """Run a distillation (on Ray unless --local), showing its progress, and print where its outputs are."""
    from gold_ray.reporting.logs import library_output
    from gold_ray.reporting.progress import progress
    from gold_ray.student.training import final_work_ratio

    cfg = _load(args)
    _note_run_dir(args, cfg.output.dir)
    where = "in this process" if args.local else "on Ray"
    mode = "json" if args.json_logs else "quiet" if args.quiet else "auto"
    s = cfg.student
    final_ratio = final_work_ratio(s)
    task_words = _task_words(cfg)
    title = f"gold-ray · {task_words} · {cfg.strategy.name} · {where} · {cfg.output.dir}"
    if not args.local:
        # Importing Ray gives its logger a stderr handler: import it before library_output routes that logger.
        from actors.driver import run_on_ray
    with library_output(cfg.output.dir, verbose=_verbose(args)), \
            progress(mode, iterations=cfg.strategy.iterations, final_ratio=final_ratio, title=title) as reporter:
        reporter.message("start", f"gold-ray: distilling task {task_words} with strategy {cfg.strategy.name} "
                                  f"{where} into {cfg.output.dir}",
                         task=cfg.task.name, strategy=cfg.strategy.name, local=args.local, run_dir=cfg.output.dir)
        if args.local:
            from gold_ray.run.loop import distill_in_process

            metrics = distill_in_process(cfg, resume=args.resume, on_event=reporter)
        else:
            if reporter.mode != "plain":
                # Even --verbose: Ray Data's bars would scroll under the live view (or break JSON lines).
                os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
            metrics = run_on_ray(cfg, resume=args.resume, on_event=reporter)
        out = Path(cfg.output.dir)
        report = out / "report.html"
        reporter.message("done", summary_text(metrics, out, tracking=cfg.tracking.enabled), run_dir=str(out),
                         report=str(report) if report.is_file() else None,
                         final=metrics.get("final", {}), mlflow=metrics.get("mlflow"))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Run every strategy x seed at the same budget and write the comparison table and plot."""
    from gold_ray.reporting.logs import library_output
    from gold_ray.reporting.progress import progress
    from gold_ray.run.compare import available_strategies, compare, parse_seeds, parse_strategies
    from gold_ray.run.loop import distill_in_process

    cfg = _load(args)
    strategies = parse_strategies(args.strategies or ",".join(available_strategies()))
    seeds = parse_seeds(args.seeds)
    out = Path(args.output or f"{cfg.output.dir}-compare")
    _note_run_dir(args, out)
    where = "in this process" if args.local else "on Ray"
    # One line per stage, each prefixed with its run (a live view of one run does not fit several).
    mode = "json" if args.json_logs else "quiet" if args.quiet else "plain"
    runner = distill_in_process
    if not args.local:
        # Imported before library_output routes Ray's logger (see cmd_distill).
        from actors.driver import run_on_ray

        runner = run_on_ray
    with library_output(out, verbose=_verbose(args)), progress(mode, eta=False) as reporter:
        reporter.message("start", f"gold-ray: comparing {', '.join(strategies)} on task {_task_words(cfg)} with seeds "
                                  f"{', '.join(map(str, seeds))} ({cfg.budget.samples} teacher samples per run) "
                                  f"{where} into {out}", strategies=strategies, seeds=seeds, out=str(out))
        table = compare(cfg, strategies, seeds, out, runner=runner, with_teacher=not args.no_teacher_fewshot,
                        reference=args.reference,
                        on_event=lambda name, stage, info: reporter(stage, {"run": name, **info}),
                        echo=lambda line: reporter.message("info", f"gold-ray: {line}"))
        text = (out / "compare.md").read_text(encoding="utf-8").rstrip("\n")
        if table.get("mlflow"):
            m = table["mlflow"]
            text += f"\nMLflow parent run: {m['parent_run_id']} in {m['tracking_uri']}"
        reporter.message("done", text, out=str(out), table=table)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild a run's report.html, or write a page comparing two runs."""
    from gold_ray.reporting.report import write_comparison, write_report

    if len(args.runs) == 1:
        path = write_report(args.runs[0], out=args.out)
    elif len(args.runs) == 2:
        a, b = (Path(r) for r in args.runs)
        path = write_comparison(a, b, args.out or a / f"compare-{b.resolve().name}.html")
    else:
        raise InputError("gold-ray report takes one run directory, or two to compare")
    print(f"gold-ray: report written to {path}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict with a run's final student; one JSON line per input (prediction and probabilities)."""
    from gold_ray.student.predict import load_run_student, predict_to_jsonl, read_inputs, text_record

    if bool(args.texts) == bool(args.file):
        raise InputError("gold-ray predict: give either texts or --file FILE.jsonl (not both)")
    from gold_ray.reporting.logs import library_output

    # Loading the student is quiet, as a run is: its predictions are what stdout is for.
    with library_output(None, verbose=bool(getattr(args, "verbose", False))):
        student, task = load_run_student(args.run_dir)
    _note_run_dir(args, args.run_dir)
    records = read_inputs(args.file, task) if args.file else [text_record(task, t) for t in args.texts]
    if args.output:
        try:
            fh = open(args.output, "w", encoding="utf-8")  # noqa: SIM115 - closed below; only opening is user input
        except OSError as err:
            raise InputError(f"--output {args.output}: cannot write there ({err.strerror})") from err
        with fh:
            n = predict_to_jsonl(student, task, records, fh)
        print(f"gold-ray: {n} predictions written to {args.output}", file=sys.stderr)
    else:
        predict_to_jsonl(student, task, records, sys.stdout)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the teacher alone as a Ray Serve app with OpenAI-compatible routes, until interrupted."""
    from actors.connect import ensure_ray
    from actors.teacher import start_teacher

    cfg = _load(args)
    ensure_ray(cfg)
    start_teacher(cfg, name="teacher")
    s = cfg.teacher.serve
    print(f"gold-ray: teacher {cfg.teacher.model} ({cfg.teacher.engine}) serving on "
          f"http://{s.host}:{s.port}/v1 (chat/completions, completions, models); Ctrl-C stops it", flush=True)
    if args.once:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    """List shipped tasks or validate task files."""
    if args.tasks_cmd == "list":
        for name, path in shipped_tasks().items():
            task = load_task(path)
            labels = ", ".join(task.label_names) if task.is_classification else f"-> {task.target_field}"
            print(f"{name:<10} {task.type:<20} {labels}")
        return 0
    from gold_ray.config import TaskConfig
    from gold_ray.student.evaluation import check_task_data

    status = 0
    for file in args.files:
        try:
            task = load_task(file)
            # A shipped task named by name is not looked up beside its file (load_task, TaskSpec.file).
            data = check_task_data(task, TaskConfig())
        except UserError as err:
            # A task file's own errors name it; a data file's name that file and line.
            print(f"INVALID {err}" if isinstance(err, TaskFileError) else f"INVALID {file}: {err}", file=sys.stderr)
            status = 2  # bad input, as every command exits
            continue
        print(f"ok {file}: task {task.name} ({task.type}, {len(task.seed_demos)} seed demos)")
        for line in data.found:
            print(f"   {line}")
        for line in data.warnings:
            print(f"   warning: {line}", file=sys.stderr)
    return status


def cmd_config(args: argparse.Namespace) -> int:
    """Print the resolved config with every default (after checking the task it names)."""
    cfg = _load(args)
    load_task(cfg.task.name)  # a bad task file is named here, not only when a run starts
    print(cfg.to_yaml(), end="")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """List embedded models, or convert and cache them (no download)."""
    from gold_ray.models import EMBEDDED, resolve_model

    if args.models_cmd == "list":
        for m in EMBEDDED.values():
            print(f"embedded:{m.name:<24} {m.role:<8} package {m.package} ({m.licence})")
        return 0
    refs = args.refs or ["embedded:smollm2-135m-instruct", "embedded:all-minilm-l6-v2"]
    for ref in refs:
        print(f"{ref} -> {resolve_model(ref)}", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``gold-ray``."""
    parser = argparse.ArgumentParser(prog="gold-ray", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    def add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
        if required:
            p.add_argument("config", help="config YAML, or a shipped config name (demo, tiny)")
        else:
            p.add_argument("config", nargs="?", help="config YAML or shipped name; defaults only if omitted")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config value, e.g. --set strategy.name=zerogen (repeatable)")

    def add_output_mode_args(p: argparse.ArgumentParser) -> None:
        mode = p.add_mutually_exclusive_group()
        mode.add_argument("--quiet", action="store_true",
                          help="no progress output; print only the result at the end")
        mode.add_argument("--json-logs", action="store_true",
                          help="one JSON object per event per line on stdout (other output goes to stderr)")
        p.add_argument("--verbose", action="store_true",
                       help="also print other libraries' output (progress bars, Ray's workers, warnings); by default "
                            "it goes to RUN_DIR/logs/libraries.log")

    p = sub.add_parser("distill", help="run a distillation")
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run in output.dir")
    p.add_argument("--overwrite", action="store_true", help="replace a different run in output.dir")
    p.add_argument("--output", help="output directory (output.dir)")
    p.add_argument("--fork-from", metavar="RUN_DIR",
                   help="start from that run's first teacher pass instead of asking the teacher again "
                        "(output.fork_from; the configs may differ only after that pass, e.g. strategy.score)")
    p.add_argument("--local", action="store_true",
                   help="run the reference loop in this process instead of on Ray (no Serve, Data or Train)")
    add_output_mode_args(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("compare", help="run strategies x seeds at one budget; write a table and a plot")
    add_config_args(p)
    p.add_argument("--strategies", help="comma-separated strategy names (default: every registered one)")
    p.add_argument("--seeds", default="2",
                   help="a number of seeds N (the seeds 0..N-1) or a comma list of seeds, e.g. 0,1 or 5, (default 2)")
    p.add_argument("--output", help="the comparison's folder (default: output.dir + '-compare')")
    p.add_argument("--local", action="store_true", help="run every distillation in this process instead of on Ray")
    p.add_argument("--no-teacher-fewshot", action="store_true",
                   help="leave out the teacher-as-classifier row (one teacher pass per eval example), here and "
                        "in the runs")
    p.add_argument("--reference", help="the strategy every other one is paired with (default: zerogen when "
                                       "compared, else the first)")
    add_output_mode_args(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="rebuild RUN_DIR/report.html, or compare two runs (RUN_A RUN_B)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="one run directory, or two to compare")
    p.add_argument("--out", help="where to write the page (default: RUN_DIR/report.html; for two runs "
                                 "RUN_A/compare-<name of RUN_B>.html)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("predict", help="predict with a run's final student (JSON lines out)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify (tasks with one input field)")
    p.add_argument("--file", help="JSONL input, one record with the task's input fields per line")
    p.add_argument("--output", help="write the JSONL predictions here instead of stdout")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("serve", help="run the teacher alone as a Ray Serve app (OpenAI-compatible HTTP)")
    add_config_args(p)
    p.add_argument("--once", action="store_true", help="start it and return (it keeps running on Ray)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("tasks", help="list or validate task files")
    tsub = p.add_subparsers(dest="tasks_cmd", required=True)
    tsub.add_parser("list", help="list shipped tasks")
    v = tsub.add_parser("validate", help="validate task YAML files and print every error with its field")
    v.add_argument("files", nargs="+")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("config", help="show the resolved config")
    csub = p.add_subparsers(dest="config_cmd", required=True)
    show = csub.add_parser("show", help="print the config with every default")
    add_config_args(show, required=False)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("models", help="embedded models")
    msub = p.add_subparsers(dest="models_cmd", required=True)
    msub.add_parser("list", help="list embedded models")
    prep = msub.add_parser("prepare", help="convert and cache embedded models (downloads nothing)")
    prep.add_argument("refs", nargs="*", help="model references (default: the embedded teacher and student)")
    p.set_defaults(func=cmd_models)

    # The top-level package `jobs` sits beside gold_ray; importing it only here keeps `import
    # gold_ray.cli` free of it (and Ray is imported only when a job command runs).
    from jobs.submit import add_job_commands

    add_job_commands(sub)
    _accept_debug_after_the_command(sub)
    return parser


_DEBUG_HELP = "on an internal error, print its full traceback to stderr"


def _accept_debug_after_the_command(sub: argparse._SubParsersAction) -> None:
    # `gold-ray distill demo --debug` should work as well as `gold-ray --debug distill demo`.
    # SUPPRESS: a sub-command that is not given --debug must not reset the global flag to False.
    for parser in sub.choices.values():
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _accept_debug_after_the_command(action)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gold-ray`` console script.

    Returns:
        The exit status: 0, 2 for bad input, 1 for an internal error (see the module docstring).
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # The reader of stdout left (`gold-ray predict ... | head`): no bug, and nothing to say.
        # stdout goes to devnull so that the interpreter's last flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as err:  # noqa: BLE001 - every failure becomes an exit status; report_failure sorts them
        return report_failure(err, prog="gold-ray", run_dir=getattr(args, "known_run_dir", None), debug=args.debug,
                              argv=["gold-ray", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
