"""Scalars to CSV and TensorBoard, and a text log, written by rank 0 only."""

from __future__ import annotations

import csv
import logging
import sys
import time
from pathlib import Path

from matekd_ds import distributed

log = logging.getLogger("matekd")


class ConsoleHandler(logging.StreamHandler):
    """Each log line on its own line: while a progress bar is drawn on the same stream, the bar
    is cleared, the line written and the bar redrawn below it (tqdm.write), instead of the line
    being appended to the bar's."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # logging must never stop a run
            self.handleError(record)


def setup_logging(log_file: Path | None) -> None:
    """Rank 0 logs INFO to the console (and the run's log file); other ranks only warnings."""
    log.handlers.clear()
    log.propagate = False
    level = logging.INFO if distributed.is_main() else logging.WARNING
    log.setLevel(level)
    console = ConsoleHandler(sys.stderr)
    console.setFormatter(logging.Formatter("[matekd] %(message)s"))
    log.addHandler(console)
    if log_file is not None and distributed.is_main():
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)


class Monitor:
    """`write(step, {"train/loss": 0.3, ...})` -> logs/scalars.csv (long format) and TensorBoard."""

    def __init__(self, log_dir: Path, csv_enabled: bool, tensorboard: bool):
        self.enabled = distributed.is_main()
        self.csv_file = None
        self.tb = None
        if not self.enabled:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        if csv_enabled:
            path = log_dir / "scalars.csv"
            fresh = not path.exists()
            self.csv_file = open(path, "a", newline="")
            self.csv = csv.writer(self.csv_file)
            if fresh:
                self.csv.writerow(["step", "name", "value", "time"])
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("tensorboard is not installed: logging to CSV only")
            else:
                self.tb = SummaryWriter(str(log_dir / "tensorboard"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        now = time.time()
        for name, value in scalars.items():
            if self.csv_file is not None:
                self.csv.writerow([step, name, f"{value:.6g}", f"{now:.3f}"])
            if self.tb is not None:
                self.tb.add_scalar(name, value, step)
        if self.csv_file is not None:
            self.csv_file.flush()

    def close(self) -> None:
        if self.csv_file is not None:
            self.csv_file.close()
        if self.tb is not None:
            self.tb.close()
