"""`matekd train|eval`: one-line errors and a non-zero exit for bad input, never a traceback."""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

from matekd_ds.errors import MatekdError

EXIT_USAGE = 2  # bad input: nothing was written
EXIT_FAILED = 1  # the run started and ended early (diverged, disk full, ...): metrics.json says why


def default_config_path() -> Path:
    return Path(str(resources.files("matekd_ds.configs") / "offline_default.yaml"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matekd", description="MATE-KD knowledge distillation on DeepSpeed")
    # The deepspeed launcher passes --local_rank=N before the sub-command; LOCAL_RANK is used instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a student (ft, kd or matekd)")
    train.add_argument("--config", help="run config (YAML or JSON); default: the embedded offline demo")
    resume = train.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="continue the run in output.dir from its newest verified checkpoint (an error if there is none)")
    resume.add_argument("--auto-resume", action="store_true",
                        help="continue the run in output.dir if there is one, else start it (for schedulers that rerun a job)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-5 method=kd")

    warm = sub.add_parser("warmup-generator", help="only the generator's MLM warm-up (matekd.generator_mlm_warmup_steps); "
                          "exports <output.dir>/generator_warm")
    warm.add_argument("--config", help="run config (YAML or JSON); default: the embedded offline demo")
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

    ev = sub.add_parser("eval", help="evaluate a model (or a run directory's student) on the task's dev sets")
    ev.add_argument("model", help="a run directory, or a model path / hub id")
    ev.add_argument("--config", help="run config giving the task and data (default: the run directory's)")
    ev.add_argument("--output", help="also write the results to this JSON file")
    ev.add_argument("overrides", nargs="*", help="dotted overrides, e.g. task=sst2 data.path=DIR")
    return parser


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command in ("train", "warmup-generator"):
            return _train(args)
        if args.command == "experiment":
            from matekd_ds import experiment
            return experiment.main(args.spec, dry_run=args.dry_run, launcher=args.launcher, report_only=args.report_only)
        return _eval(args)
    except MatekdError as err:
        print(f"matekd: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("matekd: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # a full or read-only disk while writing: the last checkpoint is intact
        what = err.strerror or _one_line(err)
        where = f" {err.filename}" if getattr(err, "filename", None) else ""
        print(f"matekd: error: could not write{where}: {what}", file=sys.stderr)
        return EXIT_FAILED


def _train(args) -> int:
    from matekd_ds import signals
    from matekd_ds.config import load_config
    from matekd_ds.health import Diverged

    signals.install()  # from start-up to exit: a SIGTERM while loading stops cleanly too
    cfg = load_config(args.config or default_config_path(), args.overrides)
    generator_only = args.command == "warmup-generator"
    if generator_only and (cfg.method != "matekd" or cfg.matekd.generator_mlm_warmup_steps == 0):
        raise MatekdError("warmup-generator needs method=matekd and matekd.generator_mlm_warmup_steps > 0")
    from matekd_ds import pipeline, summary
    from matekd_ds.run_dir import RunDir

    resume = args.resume or (args.auto_resume and RunDir(cfg.output.dir).config_file.is_file())
    try:
        metrics = pipeline.run_training(cfg, resume=resume, generator_only=generator_only)
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


def _eval(args) -> int:
    from matekd_ds import evaluation_cli

    results = evaluation_cli.evaluate_model(args.model, args.config, args.overrides)
    if results is not None:  # rank 0
        text = json.dumps(results, indent=2)
        print(text)
        if args.output:
            Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
