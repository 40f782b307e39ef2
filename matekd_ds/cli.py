"""`matekd train|warmup-generator|experiment|eval|predict|export`: one-line errors and a non-zero
exit for bad input, never a traceback. stdout holds only what a script parses (results, the
end-of-run summary); logs, warnings and progress bars go to stderr. Nothing heavy is imported
before the command line has parsed: a mistyped option fails at once."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import select
import signal
import sys
from pathlib import Path

from matekd_ds.errors import MatekdError, RunFailed

EXIT_USAGE = 2  # bad input: nothing was written
EXIT_FAILED = 1  # the run started and ended early (diverged, disk full, ...): metrics.json says why
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def default_config_path() -> Path:
    from importlib import resources  # here, not at the top: main() installs its stop handlers first

    return Path(str(resources.files("matekd_ds.configs") / "offline_default.yaml"))


# Keys that make a command line more than the demo: a real task, or models of one's own.
_NOT_THE_DEMO = re.compile(r"^(task=(?!\s*synthetic\s*$)|models\.(teacher|student|generator)=)")
CONFIG_HELP = ("run config (YAML or JSON). Without it: the embedded offline demo "
               "(matekd_ds/configs/offline_default.yaml: tiny builtin models, larger learning rates, "
               "max_length 48) when the command line names no task other than synthetic and no "
               "models.teacher/student/generator; otherwise the README's defaults (matekd_ds/config.py: "
               "max_length 128, lr 2e-5, generator lr 5e-7, a given teacher is not fine-tuned). "
               "config.yaml in the run directory records every value used")


def run_config_path(config: str | None, overrides: list[str]) -> Path | None:
    """--config; else the embedded demo for `matekd train` as the demo (no task but the
    synthetic one, no models of one's own); else None: the README's defaults, whatever the task."""
    if config:
        return Path(config)
    if any(_NOT_THE_DEMO.match(text.strip()) for text in overrides):
        return None
    return default_config_path()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matekd", description="MATE-KD knowledge distillation on DeepSpeed")
    # The deepspeed launcher passes --local_rank=N before the sub-command; LOCAL_RANK is used instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a student (ft, kd or matekd)")
    train.add_argument("--config", help=CONFIG_HELP)
    resume = train.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="continue the run in output.dir from its newest verified checkpoint "
                             "(an error if there is none)")
    resume.add_argument("--auto-resume", action="store_true",
                        help="continue the run in output.dir if there is one, else start it "
                             "(for schedulers that rerun a job)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-5 method=kd")

    warm = sub.add_parser("warmup-generator",
                          help="only the generator's MLM warm-up (matekd.generator_mlm_warmup_steps); "
                               "exports <output.dir>/generator_warm")
    warm.add_argument("--config", help=CONFIG_HELP)
    warm_resume = warm.add_mutually_exclusive_group()
    warm_resume.add_argument("--resume", action="store_true", help="continue the warm-up in output.dir")
    warm_resume.add_argument("--auto-resume", action="store_true", help="continue it if started, else start it")
    warm.add_argument("overrides", nargs="*", help="dotted overrides, e.g. models.generator=PATH")

    exp = sub.add_parser("experiment", help="an FT/KD/MATE-KD sweep over tasks and seeds, with a results table")
    exp.add_argument("spec", help="experiment spec (YAML); finished runs are skipped, so rerunning resumes")
    exp.add_argument("--dry-run", action="store_true", help="check the spec and print the planned runs")
    exp.add_argument("--launcher", default=None,
                     help="command that starts each run, e.g. 'deepspeed --num_gpus 8' (default: this python)")
    exp.add_argument("--report-only", action="store_true", help="rebuild the results table from finished runs")
    exp.add_argument("--only", metavar="REGEX", help="only the runs whose label matches (e.g. 'sst2/' or "
                     "'bf16-seed[12]$'; --dry-run lists the labels), with the teacher and generator they need")

    ev = sub.add_parser("eval", help="score a model (or a run directory's student) on its dev sets or any labeled data")
    _model_arguments(ev)
    ev.add_argument("--data", nargs="+", action="extend", metavar="SOURCE",
                    help="labeled data to score instead of the dev sets: .tsv/.csv/.jsonl/.json/.parquet files "
                         "(FILE.json:KEY: the rows under KEY), a folder saved by datasets' save_to_disk "
                         "(FOLDER:SPLIT), a GLUE folder (dev split only is enough), hub:DATASET[:CONFIG]:SPLIT; "
                         "several give one table")
    ev.add_argument("--max-examples", type=int, help="score the first N examples of each data set (default: all)")
    ev.add_argument("--label-column", help="the label column of --data files (default: the run's, or the task's)")
    ev.add_argument("--json", action="store_true", help="print the results as JSON (stdout holds nothing else)")
    ev.add_argument("--output", help="also write the results to this JSON file")
    ev.add_argument("--perturbed", action="store_true",
                    help="robustness: also score on generator-perturbed text (fixed seed and mask rate), with the "
                         "run's teacher when it has one: metrics, agreement and KL, clean and perturbed")
    ev.add_argument("--generator", help="--perturbed: the masked LM that perturbs (default: the run's)")
    ev.add_argument("--teacher", help="--perturbed: the teacher to compare with (default: the run's, if any)")
    ev.add_argument("--mask-prob", type=float, help="--perturbed: fraction of tokens rewritten (default: the run's)")
    ev.add_argument("--seed", type=int, default=0, help="--perturbed: the perturbation's seed (default 0)")
    ev.add_argument("--latency", action="store_true",
                    help="also measure CPU inference latency (p50/p90 at batch 1 and 32), throughput, size and "
                         "the speed-up over the run's teacher on this machine, as metrics.json 'deployment'")
    ev.add_argument("--record", action="store_true",
                    help="--perturbed --max-examples: record the subset's robustness in the run (robustness.json, "
                         "model cards) even over full-set numbers (default: only when there are none)")
    ev.add_argument("overrides", nargs="*", help="dotted overrides, e.g. task=sst2 data.path=DIR")

    pr = sub.add_parser("predict", help="label a file (or write GLUE test submission files) with a model")
    _model_arguments(pr)
    what = pr.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", metavar="SOURCE", help="the rows to label: .tsv/.csv/.jsonl/.json/.parquet "
                                                       "(FILE.json:KEY), a save_to_disk folder (FOLDER:SPLIT), or "
                                                       "hub:...; a label column, if any, is ignored")
    what.add_argument("--glue-test", metavar="DIR", help="a GLUE-format folder: write the GLUE leaderboard files "
                                                         "of the model's task from its test split(s) into --out DIR")
    pr.add_argument("--out", required=True,
                    help="predictions file (.tsv, .csv or .jsonl), or with --glue-test a folder")
    pr.add_argument("--id-column",
                    help="the column naming each row (default: id, idx, index or guid, else the row number)")
    pr.add_argument("--json", action="store_true", help="print a JSON summary (stdout holds nothing else)")
    pr.add_argument("--force", action="store_true",
                    help="--glue-test: write from test files with fewer (or more) rows than GLUE's test sets "
                         "(a deliberate subset; their columns are still checked)")
    pr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. task=sst2")

    ex = sub.add_parser("export", help="export a run's student (or any model of a run) for serving: --onnx")
    _model_arguments(ex)
    ex.add_argument("--onnx", action="store_true",
                    help="ONNX (opset 17, dynamic batch and length), kept only if onnxruntime's logits equal "
                         "PyTorch's within 1e-4 on the dev sets")
    ex.add_argument("--out", help="the folder to write (default: RUN/onnx, or MODEL-onnx beside a model folder)")
    ex.add_argument("--max-examples", type=int, help="check on the first N examples of each dev set (default: all)")
    ex.add_argument("overrides", nargs="*", help="dotted overrides, e.g. task=sst2 data.path=DIR")
    return parser


def _model_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("model", help="a run directory (its student), a model folder of a run (its config applies), "
                                       "or a model path / hub id (then give task=... or --config)")
    command.add_argument("--config", help="run config giving the task and columns (default: the run's)")
    command.add_argument("--text-columns", type=lambda text: [c.strip() for c in text.split(",") if c.strip()],
                         help="comma-separated text columns of the data (default: the run's, or the task's)")
    command.add_argument("--no-header", action="store_true",
                         help="the CSV/TSV file has no header line: give columns by number from 0 "
                              "(--text-columns 0 --label-column 1)")


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with `key=value` overrides anywhere in it (`train --resume train.lr=1e-4`,
    `eval RUN --json task=sst2`): argparse alone takes positionals only before the first option."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    stray = [token for token in extra if not _OVERRIDE.match(token)]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# ---------------------------------------------------------------------------------------------
# Stop signals before a command handles them itself. main() installs a handler first, before
# torch, DeepSpeed and transformers are imported (seconds), and it only notes the stop: code run
# inside an import, or an exception raised there, can leave a library half-imported and failing
# (RecursionError, "duplicate registrations"). Once the command's modules are imported, a noted
# stop ends it with one line (_take_over_stops). Then `matekd train` hands SIGTERM/SIGINT to
# signals.py (a stop at the next safe point), `matekd experiment` passes them on to its running
# job, and in eval and predict, or between jobs, a stop ends the command at once.


class StoppedBeforeHandled(BaseException):
    """A stop signal before the command took over its handling. A BaseException, as
    KeyboardInterrupt is: no library's `except Exception` swallows it mid-import."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_noted: list[int] = []  # stops that came while the command's modules were being imported


def _note_stop(signum, frame) -> None:
    _noted.append(signum)


def _stop_now(signum, frame) -> None:
    for sig in STOP_SIGNALS:  # one stop is enough: a second (Ctrl-C reaches a job twice) must not
        signal.signal(sig, signal.SIG_IGN)  # interrupt the one line that says the first one stopped it
    raise StoppedBeforeHandled(signum)


def _stop_if_noted() -> None:
    if _noted:
        raise StoppedBeforeHandled(_noted[0])


def _take_over_stops() -> None:
    """The command's modules are imported: a stop noted meanwhile ends it now, a later one at once."""
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is _note_stop:
            signal.signal(sig, _stop_now)
    _stop_if_noted()


def _stop_quietly_until_handled() -> dict[int, object] | None:
    """Note SIGTERM and SIGINT from now on; returns the handlers it replaced (None off the main
    thread, where Python allows no signal handlers)."""
    _noted.clear()
    try:
        return {sig: signal.signal(sig, _note_stop) for sig in STOP_SIGNALS}
    except ValueError:
        return None


def _restore(handlers: dict[int, object] | None) -> None:
    """Put back what main() replaced (matters when main() runs inside another program)."""
    for sig, handler in (handlers or {}).items():
        if signal.getsignal(sig) in (_note_stop, _stop_now, signal.SIG_IGN):  # not train's signals.py
            signal.signal(sig, handler)


# What a stop before the command took it over leaves, and what to do next.
_STOPPED = {"train": "during start-up (nothing was written); run the same command again",
            "warmup-generator": "during start-up (nothing was written); run the same command again",
            "experiment": "while no job was running; rerun the same command to resume"}


def _stopped_line(stop: StoppedBeforeHandled, command: str | None) -> str:
    return f"matekd: stopped by {stop} {_STOPPED.get(command or '', 'before it finished; run it again')}"


def _command_in(argv: list[str]) -> str | None:
    """The sub-command, before argparse has run (a stop may come first)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


# ---------------------------------------------------------------------------------------------
# Library logs on stderr. DeepSpeed's logger writes to stdout: the StreamHandler it adds when it
# is first imported is bound to sys.stdout, and its first words on a CPU machine are a WARNING.
# Its logger is made here first, of a class that turns any console handler added to it to stderr.

LIBRARY_LOGGERS = ("DeepSpeed",)


class _StderrNow:
    """sys.stderr as it is at each write (the terminal, a test's capture), not at the handler's making."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _to_stderr(handler: logging.Handler) -> None:
    if type(handler) is logging.StreamHandler:  # a console handler (not a file's)
        handler.setStream(_StderrNow())


class _StderrLogger(logging.Logger):
    def addHandler(self, handler: logging.Handler) -> None:
        _to_stderr(handler)
        super().addHandler(handler)


def _library_logs_to_stderr() -> None:
    """Cheap (no library is imported): a logger made already (the library imported before main(),
    as in a test process) gets its handlers turned now; one not made yet is made of _StderrLogger."""
    for name in LIBRARY_LOGGERS:
        existing = logging.Logger.manager.loggerDict.get(name)
        if isinstance(existing, logging.Logger):
            for handler in existing.handlers:
                _to_stderr(handler)
            continue
        default = logging.getLoggerClass()
        logging.setLoggerClass(_StderrLogger)
        try:
            logging.getLogger(name)
        finally:
            logging.setLoggerClass(default)


def main(argv: list[str] | None = None) -> int:
    replaced = _stop_quietly_until_handled()  # first, before any heavy import
    _library_logs_to_stderr()
    code, command = EXIT_FAILED, _command_in(sys.argv[1:] if argv is None else argv)
    finished = False
    try:
        code = _run(_parse(argv))
        finished = True
        sys.stdout.flush()  # a reader that left (`matekd ... | head`) shows here, not at interpreter exit
    except BrokenPipeError as err:
        if _stdout_reader_left():
            _quiet_stdout()
            code = code if finished else 0  # the output was being printed: the work was done
        else:
            code = _write_error(err)  # another pipe
    except StoppedBeforeHandled as stop:
        print(_stopped_line(stop, command), file=sys.stderr)
        code = 128 + stop.signum
    except MatekdError as err:
        print(f"matekd: error: {_one_line(err)}", file=sys.stderr)
        code = EXIT_USAGE
    except RunFailed as err:
        print(f"matekd: error: {_one_line(err)}", file=sys.stderr)
        code = EXIT_FAILED
    except RuntimeError as err:  # a collective failed: one line naming the lost node (peers.py)
        if not _is_collective_failure(err):
            raise
        print(f"matekd: error: {_lost_peer_line(err)}", file=sys.stderr)
        code = EXIT_FAILED
    except KeyboardInterrupt:
        print("matekd: interrupted", file=sys.stderr)
        code = 130
    except OSError as err:  # a full or read-only disk while writing: the last checkpoint is intact
        code = _write_error(err)
    finally:
        _leave_process_group(code)
        _restore(replaced)
    return code


def _write_error(err: OSError) -> int:
    what = err.strerror or _one_line(err)
    where = f" {err.filename}" if getattr(err, "filename", None) else ""
    print(f"matekd: error: could not write{where}: {what}", file=sys.stderr)
    return EXIT_FAILED


def _stdout_reader_left() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on its write end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


def _quiet_stdout() -> None:
    """`matekd ... | head`: the reader took what it wanted; no error. As the Python docs advise,
    stdout goes to /dev/null so that no later flush (at exit) fails again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _is_collective_failure(err: BaseException) -> bool:
    peers = sys.modules.get("matekd_ds.peers")  # imported with distributed, if the run got that far
    return peers is not None and peers.is_collective_failure(err)


def _lost_peer_line(err: BaseException) -> str:
    from matekd_ds import peers

    return peers.lost_peer_line(err)


def _leave_process_group(code: int) -> None:
    """Only if the command got that far: importing distributed (torch) here again, after a stop
    interrupted that import, would fail with a traceback of its own."""
    distributed = sys.modules.get("matekd_ds.distributed")
    if distributed is not None and hasattr(distributed, "shutdown"):
        distributed.shutdown(wait_for_peers=code == 0)


def _run(args) -> int:
    if args.command in ("train", "warmup-generator"):
        return _train(args)
    if args.command == "experiment":
        from matekd_ds import experiment
        _take_over_stops()  # between jobs a stop ends the sweep at once; during one it goes to the job
        return experiment.main(args.spec, dry_run=args.dry_run, launcher=args.launcher, report_only=args.report_only,
                                 only=args.only)
    if args.command == "predict":
        return _predict(args)
    if args.command == "export":
        return _export(args)
    return _eval(args)


def _train(args) -> int:
    from matekd_ds import signals
    from matekd_ds.config import load_config, uses_generator
    from matekd_ds.health import Diverged

    signals.install()  # from here to exit: a SIGTERM while loading stops cleanly too
    _stop_if_noted()  # one that came while the modules above were imported
    from matekd_ds.data.tasks import with_inferred_task

    args.overrides = with_inferred_task(args.config, args.overrides)  # data.path=../SST-2 without task=
    config_path = run_config_path(args.config, args.overrides)
    cfg = load_config(config_path, args.overrides)
    generator_only = args.command == "warmup-generator"
    if generator_only and (not uses_generator(cfg) or cfg.matekd.generator_mlm_warmup_steps == 0):
        raise MatekdError("warmup-generator needs method=matekd, matekd.perturbation=generator and "
                          "matekd.generator_mlm_warmup_steps > 0")
    from matekd_ds import pipeline, summary
    from matekd_ds.faults import FaultInjection
    from matekd_ds.run_dir import RunDir

    resume = args.resume or (args.auto_resume and RunDir(cfg.output.dir).config_file.is_file())
    faults = FaultInjection.from_environment()  # the recovery tests' MATEKD_* variables; None otherwise
    try:
        metrics = pipeline.run_training(cfg, resume=resume, generator_only=generator_only,
                                        callbacks=[faults] if faults else [])
    except signals.StopRequested as stop:
        print(f"matekd: {stop}", file=sys.stderr)
        return signals.EXIT_CODE
    except Diverged as err:
        print(f"matekd: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_FAILED
    if generator_only:
        warm = metrics.get("generator_warmup") or {}
        if "dev_after" in warm:
            print(f"generator warmed up: dev masked-token accuracy {warm['dev_before']['accuracy']:.4f} -> "
                  f"{warm['dev_after']['accuracy']:.4f}; saved to {Path(cfg.output.dir) / 'generator_warm'}")
        return 0
    summary.print_summary(metrics, cfg.output.dir)
    return 0


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def _split_overrides(args) -> None:
    """`--data a.tsv b.tsv task=x`: what looks like key=value is an override, not a source."""
    sources = args.data if isinstance(args.data, list) else []
    args.overrides = [*args.overrides, *(s for s in sources if _OVERRIDE.match(s))]
    if isinstance(args.data, list):
        args.data = [s for s in sources if not _OVERRIDE.match(s)]


@contextlib.contextmanager
def _results_only_on_stdout(progress: str | None = None):
    """While eval/predict work, anything printed (DeepSpeed's import-time warning, library output,
    even from C) goes to stderr: stdout carries the results alone. `progress`: the label of the
    progress bars (on stderr) of the scoring loops (evaluation.progress_bars)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr), _progress_bars(progress):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _progress_bars(label: str | None):
    if label is None:
        return contextlib.nullcontext()
    from matekd_ds.evaluation import progress_bars  # torch: imported with stdout on stderr already

    return progress_bars(label)


def _eval(args) -> int:
    _split_overrides(args)
    with _results_only_on_stdout(progress="eval"):
        from matekd_ds import evaluation_cli as ev
        from matekd_ds.durable import write_atomic

        _take_over_stops()
        request = ev.EvalRequest(
            args.model, args.config, args.overrides,
            ev.DataOptions(args.data or [], args.text_columns, args.label_column, args.no_header), args.max_examples,
            ev.RobustnessOptions(args.perturbed, args.generator, args.teacher, args.seed, args.mask_prob,
                                 args.record))
        if args.output:
            from matekd_ds.predict import check_output_path
            check_output_path(Path(args.output), suffixes=(), flag="--output")
        results = ev.evaluate_target(request)
        if results is not None and args.latency:  # rank 0
            from matekd_ds import deployment
            results["deployment"] = deployment.for_eval_target(args.model, args.config, args.overrides)
        text = json.dumps(results, indent=2) if results is not None else ""
        if results is not None and args.output:  # rank 0
            write_atomic(Path(args.output), text + "\n")
    if results is not None:
        print(text if args.json else _eval_table(ev.format_results(results), results))
    return 0


def _eval_table(table: str, results: dict) -> str:
    """The results table, then (--latency) the deployment numbers."""
    if "deployment" not in results:
        return table
    from matekd_ds import deployment

    return "\n".join([table, "", *deployment.format_lines(results["deployment"])])


def _predict(args) -> int:
    with _results_only_on_stdout(progress="predict"):
        from matekd_ds import evaluation_cli  # noqa: F401 - the heavy imports, before stops end the command at once

        _take_over_stops()
        if args.glue_test:
            from matekd_ds.glue_submission import SubmissionRequest, write_submission
            summary = write_submission(SubmissionRequest(args.model, Path(args.glue_test), Path(args.out), args.config,
                                                         args.overrides, force=args.force))
        else:
            if args.force:
                raise MatekdError("--force is for --glue-test (test files of another size than GLUE's)")
            from matekd_ds.predict import PredictRequest, predict_file
            summary = predict_file(PredictRequest(args.model, args.data, Path(args.out), args.config, args.overrides,
                                                  args.text_columns, args.id_column, args.no_header))
        from matekd_ds.predict import summary_line
    if summary is not None:  # rank 0
        print(json.dumps(summary, indent=2) if args.json else summary_line(summary))
    return 0


def _export(args) -> int:
    if not args.onnx:
        raise MatekdError("export: name a format: --onnx (the one supported)")
    with _results_only_on_stdout():
        from matekd_ds import onnx_export

        _take_over_stops()
        summary = onnx_export.export_target(onnx_export.ExportRequest(
            args.model, args.out, args.config, args.overrides, args.max_examples))
    print(onnx_export.summary_line(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
