"""The run directory: the one reader and writer of its layout, used by the pipeline, `matekd eval`,
the experiment runner and the quality scripts.

    config.yaml            the resolved run config
    metrics.json           status, teacher and student metrics, evaluations, throughput, memory
    robustness.json        `matekd eval RUN --perturbed`: clean and perturbed metrics of the student
    tokenizer/             the tokenizer the run trained with (a resume keeps it)
    teacher/               the teacher, when the run fine-tuned it
    generator_warm/        the generator after its MLM warm-up, when the run did one
    student/, student_best/  the exported student (save_pretrained + tokenizer)
    checkpoints/<phase>/   DeepSpeed checkpoints and loop state (checkpoint.py)
    checkpoints/LAYOUT.json  the precision, ZeRO stages, offload and world size they were written with
    logs/                  train.log, scalars.csv, tensorboard/
    .lock, .reserve        while a run is in it: its lock, and space kept for metrics.json on a full disk

Every export carries a MANIFEST.json (size and CRC-32 of its files), checked when it is read back.

Every file and folder is written durably (durable.py), by rank 0. A RunDir keeps in memory the
config it was opened with, the last metrics it wrote and the robustness record, and renders the
model cards of student/, student_best/ and teacher/ from them (model_card.py): nothing it wrote is read
back from disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from matekd_ds import distributed, model_card
from matekd_ds.checkpoint import write_export_manifest
from matekd_ds.config import RunConfig, config_from_dict, read_config_file
from matekd_ds.data.tasks import task_spec
from matekd_ds.durable import atomic_folder, write_atomic
from matekd_ds.errors import MatekdError
from matekd_ds.partition import gathered_state_dict, is_partitioned

# Keys whose change makes a checkpoint meaningless: a resume must keep them (matekd.perturbation:
# the random arm's checkpoints hold no generator engine).
RESUME_LOCKED = ("task", "method", "models", "data", "matekd.perturbation")
LOCK = ".lock"  # held (flock) by the process that runs in the directory, for the life of the run
# Space set aside while a run is in the directory: freed just before metrics.json records how the
# run ended, so that a disk filled mid-run still gets "failed" and its reason written.
RESERVE = ".reserve"
RESERVE_BYTES = 1 << 20
LAYOUT = "LAYOUT.json"  # in checkpoints/: what the checkpoints can only be resumed with


def name_labels(module: torch.nn.Module, label_names: list[str] | None) -> None:
    """id2label/label2id from the task's class names, so that the exported classifier (and
    pipelines built on it) say "positive", not "LABEL_1"."""
    config = getattr(module, "config", None)
    if label_names and config is not None and getattr(config, "num_labels", None) == len(label_names):
        config.id2label = dict(enumerate(label_names))
        config.label2id = {name: i for i, name in enumerate(label_names)}


def export_model(module: torch.nn.Module, tokenizer, path: Path, label_names: list[str] | None = None,
                 card: str | None = None) -> None:
    """save_pretrained + tokenizer (+ the model card `card` as README.md), as one folder put in
    place durably (rank 0): the export is the old one or the new one, whole. Every rank calls it:
    a ZeRO-3 module's weights are gathered first (a collective), one layer at a time."""
    state = gathered_state_dict(module) if is_partitioned(module) else None
    if not distributed.is_main():
        return
    name_labels(module, label_names)
    with atomic_folder(path) as tmp:
        if state is not None:
            module.save_pretrained(tmp, state_dict=state)
        else:
            module.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_export_manifest(tmp)  # eval, predict and a resume check the files against it
        if card is not None:
            (tmp / model_card.CARD).write_text(card)  # fsync'ed with the folder


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fd: int | None = None
        # What the cards are rendered from: set by open() (or read_state()), write_metrics() and
        # write_robustness(), never read back from the files this object wrote.
        self._cfg: RunConfig | None = None
        self._metrics: dict[str, Any] = {}
        self._robustness: dict[str, Any] | None = None

    # -- where things are

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.json"

    @property
    def robustness_file(self) -> Path:
        return self.path / "robustness.json"

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def model_dir(self, name: str) -> Path:
        """"student", "student_best", "teacher" or "generator_warm"."""
        return self.path / name

    def has_model(self, name: str) -> bool:
        return (self.model_dir(name) / "config.json").is_file()

    def checkpoints(self, phase: str) -> Path:
        return self.path / "checkpoints" / phase

    @property
    def layout_file(self) -> Path:
        return self.path / "checkpoints" / LAYOUT

    def has_checkpoints(self) -> bool:
        """Whether any phase has a checkpoint (complete or not) on disk."""
        return any(self.path.glob("checkpoints/*/trainer/step_*"))

    def is_run(self) -> bool:
        """A run directory with a finished student export (what `matekd eval RUN` scores)."""
        return self.config_file.is_file() and self.has_model("student")

    # -- reading

    def read_metrics(self) -> dict[str, Any]:
        """metrics.json, or {} when there is none yet (or it is being replaced)."""
        try:
            return json.loads(self.metrics_file.read_text()) if self.metrics_file.is_file() else {}
        except json.JSONDecodeError:
            return {}

    def status(self) -> str | None:
        return self.read_metrics().get("status")

    def read_config(self) -> dict[str, Any]:
        return read_config_file(self.config_file)

    def read_robustness(self) -> dict[str, Any] | None:
        """robustness.json, or None when robustness was not measured."""
        if not self.robustness_file.is_file():
            return None
        try:
            return json.loads(self.robustness_file.read_text())
        except json.JSONDecodeError as err:
            raise MatekdError(f"{self.robustness_file} is not valid JSON ({err}); "
                              "rerun `matekd eval RUN --perturbed` to rewrite it") from None

    def read_state(self) -> RunDir:
        """For a process that did not train the run (`matekd eval RUN --perturbed`): its config,
        metrics and robustness record, read from its files, as open() and write_metrics() would
        have left them. Returns self."""
        # the run's own values, but checked as eval checks them: its training file may be gone
        self._cfg = config_from_dict(self.read_config(), for_training=False)
        self._metrics = self.read_metrics()
        self._robustness = self.read_robustness()
        return self

    # -- writing (rank 0 writes; every rank may call)

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        text = json.dumps(metrics, indent=2)
        self._metrics = json.loads(text)  # what was written, not the caller's dict it may still change
        if distributed.is_main():
            write_atomic(self.metrics_file, text)

    def write_robustness(self, robustness: dict[str, Any]) -> None:
        """robustness.json (settings, clean and perturbed metrics, agreement, KL); refresh_cards()
        puts it in the model cards."""
        text = json.dumps(robustness, indent=2)
        self._robustness = json.loads(text)
        if distributed.is_main():
            write_atomic(self.robustness_file, text)

    def _opened_config(self) -> RunConfig:
        if self._cfg is None:
            raise RuntimeError(f"RunDir {self.path}: open() or read_state() first")
        return self._cfg

    def _card(self, name: str) -> str:
        return model_card.render(self._opened_config(), self._metrics, self._robustness, self.path.name, name)

    def export(self, name: str, module: torch.nn.Module, tokenizer) -> None:
        """A classifier export names its classes after the task's; student and teacher exports carry
        a model card (refresh_cards() rewrites it with the final metrics once the run ends). After open()."""
        cfg = self._opened_config()
        labels = task_spec(cfg).label_names if name != "generator_warm" else None
        card = self._card(name) if name in model_card.CARDED_EXPORTS and distributed.is_main() else None
        export_model(module, tokenizer, self.model_dir(name), list(labels) if labels else None, card)

    def refresh_cards(self) -> None:
        """Rewrite the model card of student/, student_best/ and teacher/ (those that exist) from what this
        object holds now: after training, after a robustness evaluation. Rank 0; a no-op elsewhere."""
        if not distributed.is_main():
            return
        for name in model_card.CARDED_EXPORTS:
            if self.has_model(name):
                write_atomic(self.model_dir(name) / model_card.CARD, self._card(name))

    def _holds_files(self) -> bool:
        return self.path.is_dir() and any(p.name not in (LOCK, RESERVE) for p in self.path.iterdir())

    def check(self, cfg: RunConfig, resume: bool) -> None:
        """Before anything is read or written: the path, --resume, and what is already there.
        Every rank checks, before the ranks rendezvous."""
        if self.path.exists() and not self.path.is_dir():
            raise MatekdError(f"output.dir {self.path} is a file, not a directory")
        _check_writable(self.path)
        if resume and not self.config_file.is_file():
            raise MatekdError(f"--resume: nothing to resume in {self.path} (no config.yaml); "
                              "start the run without --resume (or use --auto-resume)")
        if not self._holds_files():
            return
        if resume:
            # the saved config with today's defaults for keys added since it was written
            saved = config_from_dict(self.read_config()).to_dict()
            current = cfg.to_dict()
            for key in RESUME_LOCKED:
                if _dotted(saved, key) != _dotted(current, key):
                    raise MatekdError(f"--resume: '{key}' differs from the run in {self.path}; "
                                      f"a checkpoint only resumes with the same {key}")
        elif not cfg.output.overwrite:
            raise MatekdError(self._occupied_line())

    def _occupied_line(self) -> str:
        """What a new run finds in a directory that holds files, and what to do instead."""
        held = f"output directory {self.path} already holds files"
        other = "choose another output.dir, or output.overwrite=true moves it aside"
        if not self.config_file.is_file():
            return f"{held} (not a matekd run); {other}"
        status = self.status() or "no metrics.json"
        if status == "completed":
            return f"{held} of a completed run; {other}"
        return (f"{held} of an unfinished run (status: {status}); finish it by running the same command with "
                "--resume (or output.overwrite=true moves it aside)")

    def check_layout(self, layout: dict[str, Any]) -> None:
        """--resume, before anything is written: DeepSpeed's checkpoints load only into engines of
        the precision, ZeRO stage, offload and world size that wrote them (`layout`, per
        inputs.checkpoint_layout). A run that has no checkpoint yet may change them."""
        if not self.has_checkpoints() or not self.layout_file.is_file():
            return  # nothing to load, or written before layouts were recorded
        try:
            saved = json.loads(self.layout_file.read_text())
        except (OSError, ValueError):
            return  # damaged: the checkpoints' own verification and loading decide
        for key, value in saved.items():
            if layout.get(key) != value:
                raise MatekdError(f"--resume: the checkpoints in {self.path} were written with {key} {value}, this "
                                  f"run has {layout.get(key)}; a checkpoint resumes only with the precision, ZeRO "
                                  "stage, offload and world size it was written with")

    def _write_layout(self, layout: dict[str, Any] | None) -> None:
        """Rank 0, at open: the layout of the checkpoints this run will write (unless some exist)."""
        if layout is not None and not self.has_checkpoints():
            self.layout_file.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.layout_file, json.dumps(layout, indent=1))

    def check_space(self, needed_bytes: int) -> None:
        """A fresh run's checkpoints and exports must fit on the output filesystem."""
        where = _existing_ancestor(self.path)
        free = shutil.disk_usage(where).free
        if free < needed_bytes:
            raise MatekdError(f"output.dir {self.path}: its filesystem has {free / 2**20:.0f} MiB free, the run needs "
                              f"about {needed_bytes / 2**20:.0f} MiB for its checkpoints and exports")

    def check_shared(self) -> None:
        """Every rank names the same output.dir and sees the same files there: rank 0 alone
        writes LATEST, metrics.json and the exports, and a resume reads them on every rank.
        Collective; a world of one passes at once."""
        if distributed.world_size() == 1:
            return
        paths = distributed.gather_objects(str(self.path.absolute()))
        other = next(((rank, p) for rank, p in enumerate(paths) if p != paths[0]), None)
        if other is not None:
            raise MatekdError(f"output.dir differs between ranks ({paths[0]} on rank 0, {other[1]} on rank "
                              f"{other[0]}): every rank must write to one directory, on a filesystem all nodes share")
        probe = distributed.gather_objects(
            str(_existing_ancestor(self.path) / f".matekd-shared-{os.getpid()}-{time.time_ns()}"))[0]
        if distributed.is_main():
            Path(probe).write_text("")
        distributed.barrier()
        blind = [rank for rank, seen in enumerate(distributed.gather_objects(Path(probe).exists())) if not seen]
        distributed.barrier()
        if distributed.is_main():
            Path(probe).unlink(missing_ok=True)
        if blind:
            raise MatekdError(f"output.dir {self.path} is not on a filesystem every node shares: rank {blind[0]} "
                              "does not see what rank 0 writes there")

    def lock(self) -> None:
        """Take the run directory for this run (rank 0 holds an flock until the process exits).
        A directory in use by a live run is refused with its holder's PID and host; a lock left
        by a dead process is free again (the kernel drops an flock with its holder). Collective."""
        problem = self._try_lock() if distributed.is_main() else None
        problem = distributed.gather_objects(problem)[0]
        if problem:
            raise MatekdError(problem)

    def _try_lock(self) -> str | None:
        self.path.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
                os.close(fd)
                return (f"output.dir {self.path} is in use by a running matekd ({holder}); "
                        "wait for it or choose another output.dir")
            if _same_file(fd, self.path / LOCK):
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}".encode())
                os.fsync(fd)
                self._lock_fd = fd
                return None
            os.close(fd)  # its holder finished and removed it after we opened it: take the new file
        return f"output.dir {self.path}: could not take its lock (.lock keeps being replaced)"

    def unlock(self) -> None:
        """The run has ended: remove its lock (and the space kept for metrics.json). Rank 0; the
        lock file goes first, while it is still held, so no one can take a stale copy of it."""
        if self._lock_fd is None:
            return
        self.release_reserve()
        with contextlib.suppress(OSError):
            (self.path / LOCK).unlink()
        os.close(self._lock_fd)
        self._lock_fd = None

    def keep_reserve(self) -> None:
        """Set RESERVE_BYTES aside on the run's filesystem (rank 0; best effort: a disk already
        that full fails at the next write anyway)."""
        if not distributed.is_main():
            return
        try:
            fd = os.open(self.path / RESERVE, os.O_WRONLY | os.O_CREAT, 0o644)
        except OSError:
            return
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
        except OSError:
            pass
        finally:
            os.close(fd)

    def release_reserve(self) -> None:
        """Free the reserve, for the write that records how the run ended."""
        if distributed.is_main():
            with contextlib.suppress(OSError):
                (self.path / RESERVE).unlink()

    def open(self, cfg: RunConfig, resume: bool, tokenizer, layout: dict[str, Any] | None = None) -> None:
        """Create (or, resuming, reuse) the directory; set space aside for metrics.json; write
        config.yaml, the tokenizer and (before the first checkpoint) the checkpoints' `layout`;
        keep `cfg` for the model cards. Collective: call after lock()."""
        if distributed.is_main():
            if not resume and self._holds_files():
                # output.overwrite: never delete a user's trained model; move the old run aside
                # (with its lock, which this process holds), and lock the new directory.
                aside = self.path.with_name(f"{self.path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
                self.path.rename(aside)
                print(f"[matekd] moved the previous run aside to {aside}", file=sys.stderr)  # a log line
                held, self._lock_fd = self._lock_fd, None
                problem = self._try_lock()
                if held is not None:
                    with contextlib.suppress(OSError):
                        (aside / LOCK).unlink()  # the run moved aside has ended
                    os.close(held)
                if problem:
                    raise MatekdError(problem)
            self.keep_reserve()
            self.logs.mkdir(parents=True, exist_ok=True)
            write_atomic(self.config_file, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            self._write_layout(layout)
            if not self.tokenizer_dir.exists():
                with atomic_folder(self.tokenizer_dir) as tmp:
                    tokenizer.save_pretrained(tmp)
        self._cfg = cfg
        self._metrics = {}
        # a resumed run keeps its robustness record (as its cards did); a fresh one has none.
        # Only rank 0 renders cards.
        self._robustness = self.read_robustness() if resume and distributed.is_main() else None
        distributed.barrier()


def _dotted(config: dict[str, Any], key: str) -> Any:
    """config["matekd"]["perturbation"] for "matekd.perturbation"."""
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is still the one at `path` (not removed or replaced)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _check_writable(path: Path) -> None:
    """The output directory (or the folder it will be made in) must be writable."""
    where = _existing_ancestor(path)
    if not os.access(where, os.W_OK | os.X_OK):
        raise MatekdError(f"output.dir {path}: {where} is not writable")
