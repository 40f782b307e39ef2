"""`matekd train|eval`: one-line errors and a non-zero exit for bad input, never a traceback."""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

from matekd_ds.errors import MatekdError

EXIT_USAGE = 2


def default_config_path() -> Path:
    return Path(str(resources.files("matekd_ds.configs") / "offline_default.yaml"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matekd", description="MATE-KD knowledge distillation on DeepSpeed")
    # The deepspeed launcher passes --local_rank=N before the sub-command; LOCAL_RANK is used instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a student (ft, kd or matekd)")
    train.add_argument("--config", help="run config (YAML or JSON); default: the embedded offline demo")
    train.add_argument("--resume", action="store_true", help="continue the run in output.dir from its latest checkpoint")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-5 method=kd")

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
        if args.command == "train":
            return _train(args)
        return _eval(args)
    except MatekdError as err:
        print(f"matekd: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("matekd: interrupted", file=sys.stderr)
        return 130


def _train(args) -> int:
    from matekd_ds.config import load_config
    from matekd_ds.trainer import StopRequested

    cfg = load_config(args.config or default_config_path(), args.overrides)
    from matekd_ds import pipeline, summary

    try:
        metrics = pipeline.run_training(cfg, resume=args.resume)
    except StopRequested as stop:
        print(f"matekd: {stop}", file=sys.stderr)
        return 143
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
