"""The files of a run directory, written atomically; checkpoints and random state.

A run directory (``--out``) holds ``config.json``, ``metrics.csv`` and ``metrics.jsonl`` (one row
per finished epoch), ``checkpoint.pt`` (after every epoch) and figures; the classification trainer
adds ``spikes/epoch_XXX.h5`` for rule ``rdd``. Every file is written to a temporary file in the same
directory and renamed over the old one (:func:`write_atomic`), so a crash at any moment leaves the
previous version or the new one, never a mix. Checkpoints hold only tensors and plain Python values
and are loaded with ``torch.load(..., weights_only=True)``.

A run directory belongs to one process at a time: :func:`lock_run_dir` takes ``run.lock`` in it
(an ``fcntl.flock`` that the kernel releases when the process ends, however it ends), so a second
run on the same directory stops at once, and deletes the temporary files of killed runs. A resumed
run checks that ``config.json`` and the checkpoint are of the same run
(:func:`check_config_file`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from spikealign.errors import UserError
from spikealign.outputs import OutputLock, lock_holder, remove_stale_temporaries
from spikealign.trainer.config import (
    ALIGNMENT_KEYS,
    FC_LAYERS,
    TrainConfig,
    check_same_experiment,
)

#: Version of the checkpoint layout; a checkpoint of another version is refused.
CHECKPOINT_FORMAT = 1

CONFIG_FILE = "config.json"
METRICS_CSV = "metrics.csv"
METRICS_JSONL = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
LOCK_FILE = "run.lock"
SPIKES_DIR = "spikes"
ERROR_FIGURE = "error.png"
ALIGNMENT_FIGURE = "alignment.png"
#: Files a new run in an old run's directory removes first.
RUN_FILES = (
    CONFIG_FILE,
    METRICS_CSV,
    METRICS_JSONL,
    CHECKPOINT_FILE,
    ERROR_FIGURE,
    ALIGNMENT_FIGURE,
)


def spike_log_path(out_dir: str | Path, epoch: int) -> Path:
    return Path(out_dir) / SPIKES_DIR / f"epoch_{epoch:03d}.h5"


def write_atomic(path: Path, write: Callable[[io.IOBase], None], binary: bool = False) -> None:
    """Write with ``write(file)`` into a temporary file beside ``path``, then replace ``path``."""
    # Not tempfile.mkstemp: its files are private (0600); this one gets the user's umask.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb" if binary else "w", newline=None if binary else "") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_metrics(out_dir: Path, rows: Sequence[dict]) -> None:
    """(Re)write metrics.csv and metrics.jsonl from all rows so far.

    The CSV holds a row's plain values; nested ones (per-layer alignment) go to the JSONL only.
    """
    columns = [key for key, value in rows[0].items() if not isinstance(value, dict)] if rows else []

    def write_csv(file):
        writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    write_atomic(out_dir / METRICS_CSV, write_csv)
    # JSON has no NaN: undefined values (dfa's alignment) are written as null.
    json_rows = [_nan_to_none(row) for row in rows]
    write_atomic(
        out_dir / METRICS_JSONL, lambda f: f.writelines(json.dumps(r) + "\n" for r in json_rows)
    )


def _nan_to_none(value):
    """``value`` with every float NaN (in nested dicts too) replaced by None."""
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def write_config(out_dir: Path, config) -> None:
    write_atomic(out_dir / CONFIG_FILE, lambda f: json.dump(asdict(config), f, indent=2))


@dataclass
class RunRecord:
    """A run directory as read back: its config and its metric rows (one per finished epoch)."""

    path: Path
    config: TrainConfig
    rows: list[dict]

    @property
    def multilabel(self) -> bool:
        return bool(self.rows) and "test_map" in self.rows[0]

    @property
    def score_key(self) -> str:
        return "test_map" if self.multilabel else "test_error"


def read_run(run_dir: str | Path) -> RunRecord:
    """Read config.json and metrics.jsonl of a run directory (UserError if it is not one)."""
    run_dir = Path(run_dir)
    config_path, metrics_path = run_dir / CONFIG_FILE, run_dir / METRICS_JSONL
    for path in (config_path, metrics_path):
        if not path.is_file():
            raise UserError(
                f"{run_dir} is not a training run directory (no {path.name}); "
                "pass a directory written by python -m training.run --out"
            )
    try:
        config = TrainConfig.from_dict(json.loads(config_path.read_text()))
        rows = [
            {k: math.nan if v is None else v for k, v in json.loads(line).items()}
            for line in metrics_path.read_text().splitlines()
            if line
        ]
    except (json.JSONDecodeError, TypeError, AttributeError, ValueError) as err:
        reason = " ".join(str(err).split())
        raise UserError(f"cannot read the run in {run_dir}: {reason}") from None
    _check_rows(rows, metrics_path)
    return RunRecord(run_dir, config, rows)


def _check_rows(rows: list[dict], path: Path) -> None:
    """Every metrics row holds the numbers the figures and the table use."""
    for number, row in enumerate(rows, 1):
        score = "map" if "test_map" in row else "error"
        needed = ["epoch", "train_loss", f"train_{score}", "test_loss", f"test_{score}"]
        needed += [f"{layer}_{key}" for layer in FC_LAYERS for key in ALIGNMENT_KEYS]
        missing = [key for key in needed if key not in row]
        wrong = [
            key
            for key in needed
            if key in row and (isinstance(row[key], bool) or not isinstance(row[key], int | float))
        ]
        if missing or wrong:
            problem = f"lacks {', '.join(missing)}" if missing else f"has non-numbers in {wrong}"
            raise UserError(
                f"{path} line {number} {problem}; it was not written by python -m training.run"
            )


# --------------------------------------------------------------------------------------------------
# Checkpoints and random state


def numpy_to_torch(value):
    """Numpy arrays -> tensors (recursively), so checkpoints load with ``weights_only=True``."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: numpy_to_torch(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(numpy_to_torch(item) for item in value)
    return value


def torch_to_numpy(value):
    """Inverse of :func:`numpy_to_torch`."""
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        return {key: torch_to_numpy(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(torch_to_numpy(item) for item in value)
    return value


def rng_state(loader_generator: torch.Generator) -> dict:
    """States of every random generator the training touches."""
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": numpy_to_torch(numpy_state),
        "python": random.getstate(),
        "loader": loader_generator.get_state(),
    }


def set_rng_state(state: dict, loader_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(torch_to_numpy(state["numpy"]))
    random.setstate(state["python"])
    loader_generator.set_state(state["loader"])


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    write_atomic(path, lambda file: torch.save(checkpoint, file), binary=True)


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint (``weights_only=True``); UserError if it is missing or unreadable."""
    if not path.is_file():
        raise UserError(f"no checkpoint {path}: nothing to resume; start the run without --resume")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a damaged or foreign file
        raise UserError(
            f"cannot read checkpoint {path} ({type(err).__name__}); delete it"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a spikealign training checkpoint; delete it or pick --out")
    return checkpoint


def resume_config(out_dir: str | Path, overrides: dict | None = None, config_class=TrainConfig):
    """The config stored in ``out_dir``'s checkpoint with ``overrides`` applied.

    Only the config class's ``runtime_fields`` may differ from the stored values; any other
    override that differs is a UserError (it would make the resumed run a different experiment).
    """
    holder = lock_holder(Path(out_dir) / LOCK_FILE)
    if holder is not None:
        raise UserError(
            f"run directory {out_dir} is in use by another process (pid {holder}); wait for it "
            "to end before resuming"
        )
    checkpoint = load_checkpoint(Path(out_dir) / CHECKPOINT_FILE)
    stored = config_class.from_dict(checkpoint["config"])
    asked = replace(stored, **dict(overrides or {}))
    check_same_experiment(stored, asked, Path(out_dir))
    return asked


def lock_run_dir(out_dir: Path) -> OutputLock:
    """Own ``out_dir`` for this process (UserError if another process runs there); then delete
    the temporary files of atomic writes that killed runs left behind."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; give a directory for the run")
    try:
        lock = OutputLock(out_dir / LOCK_FILE, f"run directory {out_dir}", "--out")
    except OSError as err:
        raise UserError(
            f"cannot write to output directory {out_dir} ({err.strerror}); choose another --out"
        ) from None
    remove_stale_temporaries(out_dir)
    return lock


def check_config_file(out_dir: Path, checkpoint: dict, config_class=TrainConfig) -> None:
    """Refuse a directory whose config.json is of another run than its checkpoint."""
    path = out_dir / CONFIG_FILE
    if not path.is_file():
        return
    try:
        written = asdict(config_class.from_dict(json.loads(path.read_text())))
    except (json.JSONDecodeError, UserError, TypeError, AttributeError) as err:
        raise UserError(
            f"{path} is unreadable ({err}); delete it to resume from the checkpoint"
        ) from None
    stored = asdict(config_class.from_dict(checkpoint["config"]))
    conflicts = [
        f"{name}: {written[name]!r} in {CONFIG_FILE}, {stored[name]!r} in {CHECKPOINT_FILE}"
        for name in stored
        if name not in config_class.runtime_fields and written.get(name) != stored[name]
    ]
    if conflicts:
        raise UserError(
            f"{out_dir} holds files of two runs ({'; '.join(conflicts)}); resume from a "
            "directory of one run, or start again with --overwrite"
        )


def prepare_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Create ``out_dir`` and check it can be written; refuse to clobber an existing run.

    A new run removes the files of an earlier one (with ``overwrite``, or when that run died
    before its first checkpoint).
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as err:
        raise UserError(
            f"cannot write to output directory {out_dir} ({err.strerror}); choose another --out"
        ) from None
    if resume:
        return
    if (out_dir / CHECKPOINT_FILE).exists() and not overwrite:
        raise UserError(
            f"{out_dir} already holds a run ({CHECKPOINT_FILE}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out"
        )
    for name in RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)
    for log in (out_dir / SPIKES_DIR).glob("epoch_*.h5*"):
        log.unlink()
