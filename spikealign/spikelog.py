"""HDF5 spike log of the spiking feedback-training phase (schema version 3).

One file holds one phase: the spikes of every LIF layer, the RDD window events of the noise-driven
layers, the drive schedule that was run, the alignment between forward weights W and feedback Y as
the run goes, the stopping criterion (predicted sign agreement) after every segment, and at the
end W, Y before/after and the causal-effect estimates beta of every fully connected weight matrix.
The layout is documented as a table in docs/spikelog.md. Version 2 added ``/criterion``; version 3
lets one segment drive several layers (one schedule row each, with equal start and end). The
reader opens versions 1 and 2 too and gives version 1 an empty criterion table.

Writing (:class:`SpikeLogWriter`) is crash-safe: after the writing process dies at any moment
(``kill -9`` included), the reader returns exactly the data of the last commit, or says the log is
damaged; never other data.

- One writer per log: the writer holds ``X.h5.lock`` (``fcntl.flock``, released by the kernel when
  the process ends); a second writer of the same log stops at once with a UserError.
- Appends are buffered in memory and reach the file only in :meth:`SpikeLogWriter.flush`. The file
  is written in HDF5's SWMR mode (single writer, multiple readers), whose write order keeps the
  file's structure consistent at every moment. Every dataset exists from the start; a flush
  appends each column's new entries starting at the next chunk boundary, so a chunk holding
  committed data is never written again, then flushes HDF5 and fsyncs, and only then appends one
  row to ``/status/commits`` (a chunk of its own) that records ``simulated_until`` and where each
  column's committed entries end. Whatever a killed flush wrote past the last commit is ignored.
- Every chunk carries a fletcher32 checksum, so a torn write is found on reading.
- The writer writes ``X.h5.partial`` and renames it to ``X.h5`` (os.replace) only after the commit
  that marks it ``complete``.

Reading (:class:`SpikeLog`, :func:`open_log`) checks the file first and turns every problem
(missing, not HDF5, truncated, foreign, newer version, damaged) into a one-line
:class:`~spikealign.errors.UserError`. Before reading a column it checks the committed size against
what the attributes allow (memory stays bounded); after reading, the ranges of indices and the
times against the flush that committed them. A running phase's ``.partial`` log is read as an SWMR
reader: it shows the state of the last commit. Version 1 logs (no commit table, written in place)
are still read, with the same checks.

Firing rates: rate_i = (spikes of neuron i) / T_l, where T_l is the time layer l was simulated: the
total length of the schedule segments in which l was the driven layer or above it (a layer below
the driven one gets no input, METHOD.md section 2).

Plots (:func:`plot_raster`, :func:`plot_rates`, :func:`plot_alignment`) take a SpikeLog and a PNG
path and draw with matplotlib's Agg canvas.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from spikealign.errors import UserError
from spikealign.outputs import (
    OutputLock,
    check_output_file,
    lock_holder,
    remove_stale_temporaries,
)

FORMAT = "spikealign.spikelog"
VERSION = 3  # 2: SWMR, chunk-aligned flushes, /status/commits, /criterion; 3: segments driving
# several layers (rows with equal start and end); 1 and 2 are still read
PARTIAL_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"
COMMITS = "status/commits"
WRITTEN_BY = "python -m sims.rdd_phase --log"

# 32768 elements = 256 KiB of float64 per chunk: ~30 chunks for 1e6 spikes, within HDF5's
# recommended 10 KiB - 1 MiB chunk size, and a small compressed chunk for near-empty datasets.
CHUNK_ELEMENTS = 32768
#: Chunk of the small tables (schedule, alignment): a flush adds a few rows, and starts a new chunk.
TABLE_CHUNK_ELEMENTS = 256
_COMPRESSION = {"compression": "gzip", "compression_opts": 4, "shuffle": True, "fletcher32": True}

# Column datasets of the appendable tables: group -> {column: stored dtype}.
SPIKE_COLUMNS = {"spike_times": np.float64, "spike_indices": np.int32}
WINDOW_COLUMNS = {
    "neuron": np.int32,
    "start": np.float64,
    "end": np.float64,
    "u_max": np.float32,
    "spiked": np.uint8,  # 0/1; the reader returns bool
}
SCHEDULE_COLUMNS = {"layer": np.int32, "start": np.float64, "end": np.float64}
ALIGNMENT_COLUMNS = {
    "time": np.float64,
    "fc": np.int32,
    "angle_deg": np.float64,
    "sign_agreement": np.float64,
    "norm_ratio": np.float64,
}
#: Version 2: the stopping criterion after each segment (spikealign.rdd.predicted_sign_agreement).
CRITERION_COLUMNS = {"time": np.float64, "fc": np.int32, "predicted_sign_agreement": np.float64}
WEIGHT_NAMES = ("W", "Y_before", "Y_after", "beta")


def layer_names(sizes: tuple[int, ...] | list[int]) -> list[str]:
    """Names of the LIF layers: "L0" (the input side) .. "L{n-1}"."""
    return [f"L{index}" for index in range(len(sizes))]


def fc_names(sizes: tuple[int, ...] | list[int]) -> list[str]:
    """Names of the weight matrices: "fc1" maps L0 to L1, ..., "fc{n-1}"."""
    return [f"fc{index}" for index in range(1, len(sizes))]


def _resolve(key: int | str, names: list[str], kind: str, where: str) -> int:
    """Index of a layer/fc given by index or name; UserError naming the valid choices."""
    if isinstance(key, str):
        if key in names:
            return names.index(key)
    elif isinstance(key, int | np.integer) and 0 <= int(key) < len(names):
        return int(key)
    raise UserError(
        f"{where}: unknown {kind} {key!r}; use one of {', '.join(names)} "
        f"or an index 0..{len(names) - 1}"
    )


def _params_json(params: dict) -> str:
    """JSON text of the run parameters (numpy values, paths and dataclasses converted)."""

    def convert(value: Any) -> Any:
        if isinstance(value, np.ndarray | np.generic):
            return value.tolist()
        if isinstance(value, Path):
            return str(value)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.asdict(value)
        raise TypeError(type(value).__name__)

    if not isinstance(params, dict):
        raise UserError(f"spike log params must be a dict, got {type(params).__name__}")
    try:
        return json.dumps(params, default=convert, sort_keys=True)
    except TypeError as err:
        raise UserError(
            f"spike log params hold a value of type {err} that JSON cannot store; "
            "pass numbers, strings, lists, dicts or dataclasses"
        ) from None


def _time_column(column_path: str) -> bool:
    """Columns holding the simulated time of each entry; a flush must cover those times."""
    table, _, column = column_path.rpartition("/")
    if column == "spike_times" or (table.startswith("windows/") and column == "end"):
        return True
    return column_path in ("schedule/end", "alignment/time")


def _numeric(values, what: str) -> np.ndarray:
    """A float32 copy of a real-valued array; UserError for text, complex or non-finite values."""
    array = np.asarray(values)
    if array.dtype.kind not in "biuf":
        raise UserError(f"{what} must hold real numbers, got dtype {array.dtype}")
    with np.errstate(over="ignore"):
        array = array.astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise UserError(f"{what} holds NaN or infinite values (or values beyond float32)")
    return array


class SpikeLogWriter:
    """Write one phase's spike log; use as a context manager.

    ``SpikeLogWriter(path, sizes, dt, params, seed)`` takes the output lock ``path + ".lock"``
    (one writer per log: a second one gets a UserError at once) and creates
    ``path + ".partial"`` with the full (empty) layout. The ``append_*`` methods and
    :meth:`write_weights` queue data in memory; :meth:`flush` writes the queue and commits the
    simulated time it covers; :meth:`close` commits the log as complete and renames it to
    ``path``. Leaving the ``with`` block on an exception closes the file without writing the
    queue, so the ``.partial`` file holds the last committed state. Layers and fc matrices are
    given by index or name ("L0", "fc1").

    Every entry of a time column (spike times, window ends, segment ends, alignment times) must
    lie in the interval the flush covers, from the previous ``simulated_until`` to the new one.
    """

    def __init__(
        self, path: str | os.PathLike, sizes: list[int], dt: float, params: dict, seed: int
    ):
        self.path = Path(path)
        self.partial_path = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        if len(sizes) < 2 or any(int(size) != size or size < 1 for size in sizes):
            raise UserError(f"spike log sizes must be >= 2 positive integers, got {list(sizes)}")
        if not (math.isfinite(dt) and dt > 0):
            raise UserError(f"spike log dt must be a positive time step in seconds, got {dt}")
        self.sizes = tuple(int(size) for size in sizes)
        self.dt = float(dt)
        self.layer_names = layer_names(self.sizes)
        self.fc_names = fc_names(self.sizes)
        self.simulated_until = 0.0
        self._pending: dict[str, list[np.ndarray]] = {}  # dataset path -> queued parts
        self._pending_weights: dict[tuple[str, str], np.ndarray] = {}  # ("fc1", "W") -> matrix
        params_text = _params_json(params)
        check_output_file(self.path, "spike log")
        self._lock = OutputLock(lock_path(self.path), self.path, "log path")
        self._file: h5py.File | None = None
        # Created under a temporary name and renamed once it holds its first commit: a
        # .partial file always has one. A killed creation leaves the temporary file, which the
        # next writer in the directory deletes.
        creating = self.path.with_name(f".{self.partial_path.name}.{os.getpid()}.tmp")
        try:
            self.partial_path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.partial_path.parent)
            # libver "latest" for SWMR; HDF5 file locking off: our own lock says who writes
            self._file = h5py.File(creating, "w", libver="latest", locking=False)
            self._create_layout(self.dt, params_text, int(seed))
            self._commit(complete=False)
            self._file.swmr_mode = True  # from here on the file is consistent at every write
            self._file.flush()
            _fsync(creating)
            os.replace(creating, self.partial_path)  # HDF5 keeps writing through its descriptor
        except BaseException:
            if self._file is not None:
                self._file.close()
                self._file = None
            creating.unlink(missing_ok=True)
            self._lock.release()
            raise

    def _create_layout(self, dt: float, params_text: str, seed: int) -> None:
        file = self._file
        file.attrs.update(
            {
                "format": FORMAT,
                "version": np.int64(VERSION),
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "sizes": np.asarray(self.sizes, dtype=np.int64),
                "layer_names": self.layer_names,
                "fc_names": self.fc_names,
                "dt": dt,
                "params_json": params_text,
                "seed": np.int64(seed),
            }
        )
        tables = [(f"layers/{name}", SPIKE_COLUMNS) for name in self.layer_names]
        tables += [(f"windows/{name}", WINDOW_COLUMNS) for name in self.layer_names]
        tables += [("schedule", SCHEDULE_COLUMNS), ("alignment", ALIGNMENT_COLUMNS)]
        tables += [("criterion", CRITERION_COLUMNS)]
        # Every dataset exists from the start: SWMR writing can append, not create.
        self._columns: list[str] = []
        for group_path, columns in tables:
            group = file.require_group(group_path)
            per_neuron = group_path.startswith(("layers/", "windows/"))
            chunk = CHUNK_ELEMENTS if per_neuron else TABLE_CHUNK_ELEMENTS
            for column, dtype in columns.items():
                group.create_dataset(
                    column,
                    shape=(0,),
                    maxshape=(None,),
                    dtype=dtype,
                    chunks=(chunk,),
                    **_COMPRESSION,
                )
                self._columns.append(f"{group_path}/{column}")
        self._weight_keys = [f"{fc}/{name}" for fc in self.fc_names for name in WEIGHT_NAMES]
        for fc, name in enumerate(self.fc_names):
            group = file.create_group(f"weights/{name}")
            shape = (self.sizes[fc + 1], self.sizes[fc])
            for key in WEIGHT_NAMES:
                group.create_dataset(
                    key, shape=shape, dtype=np.float32, chunks=True, **_COMPRESSION
                )
        n_columns, n_weights = len(self._columns), len(self._weight_keys)
        commits = file.create_dataset(
            COMMITS,
            shape=(0,),
            maxshape=(None,),
            dtype=commit_dtype(n_columns, n_weights),
            chunks=(1,),  # one chunk per commit: a commit never rewrites an earlier one
            fletcher32=True,
        )
        commits.attrs["columns"] = self._columns
        commits.attrs["weights"] = self._weight_keys
        self._ends = np.zeros(n_columns, np.int64)  # committed length of every column
        self._starts = np.zeros(n_columns, np.int64)
        self._weights_written = np.zeros(n_weights, np.uint8)

    # -- queueing -------------------------------------------------------------------------------
    # -- queueing -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._file is None:
            raise UserError(f"spike log {self.partial_path} is closed; it takes no more data")

    def _queue(self, group_path: str, columns: dict[str, np.ndarray]) -> None:
        for column, values in columns.items():
            self._pending.setdefault(f"{group_path}/{column}", []).append(values)

    def _column(self, values, dtype, what: str, length: int | None = None) -> np.ndarray:
        array = np.asarray(values)
        if array.ndim != 1:
            raise UserError(f"{what} must be a 1-D array, got shape {array.shape}")
        if length is not None and len(array) != length:
            raise UserError(f"{what} has {len(array)} entries, expected {length} like the others")
        if np.issubdtype(dtype, np.integer) and len(array):
            if array.dtype.kind not in "biu":  # bool, signed or unsigned integers
                raise UserError(f"{what} must hold integers, got dtype {array.dtype}")
        elif np.issubdtype(dtype, np.floating) and len(array):
            if array.dtype.kind not in "biuf":
                raise UserError(f"{what} must hold real numbers, got dtype {array.dtype}")
            if not np.all(np.isfinite(array)):
                raise UserError(f"{what} holds NaN or infinite values")
        return array.astype(dtype)  # a copy: the caller may reuse its buffer before flush()

    def _neurons(self, values, layer: int, what: str, length: int | None = None) -> np.ndarray:
        neurons = self._column(values, np.int32, what, length)
        size = self.sizes[layer]
        if len(neurons) and (neurons.min() < 0 or neurons.max() >= size):
            raise UserError(
                f"{what} must lie in 0..{size - 1} ({self.layer_names[layer]} has {size} neurons)"
            )
        return neurons

    def append_spikes(self, layer: int | str, times, indices) -> None:
        """Queue spikes of one layer: times (s) and neuron indices, equal-length 1-D arrays."""
        self._check_open()
        l = _resolve(layer, self.layer_names, "layer", "append_spikes")
        times = self._column(times, np.float64, "append_spikes times")
        indices = self._neurons(indices, l, "append_spikes indices", len(times))
        self._queue(
            f"layers/{self.layer_names[l]}", {"spike_times": times, "spike_indices": indices}
        )

    def append_windows(self, layer: int | str, neuron, start, end, u_max, spiked) -> None:
        """Queue RDD window events of one layer: one entry per closed window."""
        self._check_open()
        l = _resolve(layer, self.layer_names, "layer", "append_windows")
        neuron = self._neurons(neuron, l, "append_windows neuron")
        n = len(neuron)
        columns = {
            "neuron": neuron,
            "start": self._column(start, np.float64, "append_windows start", n),
            "end": self._column(end, np.float64, "append_windows end", n),
            "u_max": self._column(u_max, np.float32, "append_windows u_max", n),
            "spiked": self._column(
                np.asarray(spiked, dtype=bool), np.uint8, "append_windows spiked", n
            ),
        }
        self._queue(f"windows/{self.layer_names[l]}", columns)

    def append_schedule(self, layer: int | str, start: float, end: float) -> None:
        """Queue one schedule row: ``layer`` was noise-driven from ``start`` to ``end`` (s). A
        segment driving several layers gets one row per layer, with the same start and end."""
        self._check_open()
        l = _resolve(layer, self.layer_names, "layer", "append_schedule")
        if not (np.isfinite(start) and np.isfinite(end) and end > start):
            raise UserError(f"append_schedule needs start < end in seconds, got {start}, {end}")
        self._queue(
            "schedule",
            {
                "layer": np.array([l], np.int32),
                "start": np.array([start], np.float64),
                "end": np.array([end], np.float64),
            },
        )

    def append_alignment(
        self,
        time: float,
        fc_index: int | str,
        angle_deg: float,
        sign_agreement: float,
        norm_ratio: float,
    ) -> None:
        """Queue one alignment record of W vs Y for one fc matrix at simulated ``time`` (s)."""
        self._check_open()
        fc = _resolve(fc_index, self.fc_names, "fc matrix", "append_alignment")
        row = {"time": time, "angle_deg": angle_deg}
        row |= {"sign_agreement": sign_agreement, "norm_ratio": norm_ratio}
        columns = {key: np.array([value], np.float64) for key, value in row.items()}
        columns["fc"] = np.array([fc], np.int32)
        self._queue("alignment", columns)

    def append_criterion(
        self, time: float, fc_index: int | str, predicted_sign_agreement: float
    ) -> None:
        """Queue the stopping criterion of one fc matrix at simulated ``time`` (s): its predicted
        sign agreement (%), computed from the recorded data alone."""
        self._check_open()
        fc = _resolve(fc_index, self.fc_names, "fc matrix", "append_criterion")
        if not (np.isfinite(time) and 0 <= predicted_sign_agreement <= 100):
            raise UserError(
                "append_criterion needs a finite time and a sign agreement in 0..100 %, got "
                f"{time}, {predicted_sign_agreement}"
            )
        self._queue(
            "criterion",
            {
                "time": np.array([time], np.float64),
                "fc": np.array([fc], np.int32),
                "predicted_sign_agreement": np.array([predicted_sign_agreement], np.float64),
            },
        )

    def write_weights(
        self, fc_name: int | str, W=None, Y_before=None, Y_after=None, beta=None
    ) -> None:
        """Queue the given matrices of one fc (out x in, stored float32).

        A repeat before the next flush replaces the queued matrix; a flushed matrix is final."""
        self._check_open()
        fc = _resolve(fc_name, self.fc_names, "fc matrix", "write_weights")
        shape = (self.sizes[fc + 1], self.sizes[fc])
        given = {"W": W, "Y_before": Y_before, "Y_after": Y_after, "beta": beta}
        for name, matrix in given.items():
            if matrix is None:
                continue
            if self._weights_written[self._weight_keys.index(f"{self.fc_names[fc]}/{name}")]:
                raise UserError(
                    f"write_weights {self.fc_names[fc]} {name} is already in the log; each "
                    "matrix is written once"
                )
            matrix = _numeric(matrix, f"write_weights {self.fc_names[fc]} {name}")
            if matrix.shape != shape:
                raise UserError(
                    f"write_weights {self.fc_names[fc]} {name} has shape {matrix.shape}, "
                    f"expected {shape} (out x in)"
                )
            self._pending_weights[self.fc_names[fc], name] = matrix

    # -- writing --------------------------------------------------------------------------------

    def _check_times(self, simulated_until: float) -> None:
        """Queued times must lie in (roughly) [last simulated_until, simulated_until]."""
        low, high = self.simulated_until - self.dt, simulated_until + self.dt
        for column_path, parts in self._pending.items():
            if not _time_column(column_path):
                continue
            for values in parts:
                if len(values) and (values.min() < low or values.max() > high):
                    raise UserError(
                        f"/{column_path} holds times from {values.min():g} to {values.max():g} s "
                        f"but this flush covers {self.simulated_until:g} to {simulated_until:g} s; "
                        "flush(t) commits everything up to t, so append each entry before the "
                        "flush that covers its time"
                    )

    def flush(self, simulated_until: float) -> None:
        """Write everything queued, then commit that the log covers time 0..simulated_until (s)."""
        self._write(simulated_until, complete=False)

    def _write(self, simulated_until: float, complete: bool) -> None:
        self._check_open()
        simulated_until = float(simulated_until)
        if not (math.isfinite(simulated_until) and simulated_until >= self.simulated_until):
            raise UserError(
                f"flush simulated_until={simulated_until} s goes back before the last flushed "
                f"{self.simulated_until} s"
            )
        self._check_times(simulated_until)
        file = self._file
        starts, ends = self._ends.copy(), self._ends.copy()
        for index, column_path in enumerate(self._columns):
            parts = self._pending.get(column_path)
            new = None if not parts else parts[0] if len(parts) == 1 else np.concatenate(parts)
            if new is None or len(new) == 0:
                continue
            dataset = file[column_path]
            chunk = dataset.chunks[0]
            # Start at the next chunk boundary: the chunk holding committed data is never
            # written again, so a crash during this write cannot touch it.
            start = -(-int(self._ends[index]) // chunk) * chunk
            dataset.resize((start + len(new),))
            dataset[start:] = new
            starts[index], ends[index] = start, start + len(new)
        written = self._weights_written.copy()
        for (fc_name, name), matrix in self._pending_weights.items():
            file[f"weights/{fc_name}/{name}"][...] = matrix
            written[self._weight_keys.index(f"{fc_name}/{name}")] = 1
        # Data first, on disk; only then the commit that points to it.
        file.flush()
        _fsync(self.partial_path)
        self._starts, self._ends, self._weights_written = starts, ends, written
        self.simulated_until = simulated_until
        self._pending.clear()
        self._pending_weights.clear()
        self._commit(complete)
        file.flush()
        _fsync(self.partial_path)

    def _commit(self, complete: bool) -> None:
        """Append one commit row (a chunk of its own, written once)."""
        commits = self._file[COMMITS]
        row = np.zeros((), commits.dtype)
        row["simulated_until"] = self.simulated_until
        row["complete"] = int(complete)
        row["start"], row["end"] = self._starts, self._ends
        row["weights"] = self._weights_written
        commits.resize((commits.shape[0] + 1,))
        commits[-1] = row

    def close(self, simulated_until: float | None = None) -> Path:
        """Flush, commit the log as complete and rename it to ``path``; returns ``path``."""
        if self._file is None:
            return self.path
        try:
            self._write(
                self.simulated_until if simulated_until is None else simulated_until,
                complete=True,
            )
            self._file.close()
            self._file = None
            _fsync(self.partial_path)
            os.replace(self.partial_path, self.path)
            _fsync(self.path.parent)
        finally:
            self.abandon()
        return self.path

    def abandon(self) -> None:
        """Close without writing the queue; the ``.partial`` file keeps the last committed state."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._lock.release()

    def __enter__(self) -> SpikeLogWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()


def commit_dtype(n_columns: int, n_weights: int) -> np.dtype:
    """A row of ``/status/commits``: what one flush committed (see docs/spikelog.md)."""
    return np.dtype(
        [
            ("simulated_until", np.float64),
            ("complete", np.uint8),
            ("start", np.int64, (n_columns,)),
            ("end", np.int64, (n_columns,)),
            ("weights", np.uint8, (n_weights,)),
        ]
    )


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of a log (given by its final or its ``.partial`` name)."""
    path = Path(path)
    name = path.name.removesuffix(PARTIAL_SUFFIX)
    return path.with_name(name + LOCK_SUFFIX)


def _fsync(path: Path) -> None:
    """Push the file's written pages to disk (HDF5's flush only hands them to the OS)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# -- reading ------------------------------------------------------------------------------------

#: deflate cannot compress more than about 1032:1; no honest dataset is larger than this x file.
_MAX_COMPRESSION = 1100


def _open_file(path: Path) -> h5py.File:
    """Open ``path`` read-only as a spike log, or raise a one-line UserError saying why not."""
    hint = f"expected a file written by {WRITTEN_BY}"
    if not path.exists():
        partial = path.with_name(path.name + PARTIAL_SUFFIX)
        if partial.exists():
            raise UserError(
                f"{path} does not exist, but {partial} does (a run cut short or still running); "
                "inspect that file"
            )
        raise UserError(f"{path} does not exist; {hint}")
    if not path.is_file():
        raise UserError(f"{path} is not a file; {hint}")
    if not h5py.is_hdf5(path):
        raise UserError(f"{path} is not an HDF5 file; {hint}")
    try:
        # No HDF5 locking: a log being written is opened as an SWMR reader (version 2), which
        # sees the state of some moment of the writer, always consistent.
        try:
            file = h5py.File(path, "r", locking=False)
        except OSError as err:
            if "already open for write" not in str(err):
                raise
            file = h5py.File(path, "r", swmr=True, locking=False)
    except OSError as err:
        holder = lock_holder(lock_path(path))
        if holder is not None:
            raise UserError(
                f"{path} is being written (process {holder}) and cannot be read at this moment; "
                "try again in a second"
            ) from None
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{path} is truncated or corrupt (HDF5: {reason}); {hint}") from None
    problem = None
    if "format" not in file.attrs:
        problem = f"{path} is not a spikealign spike log (no 'format' attribute); {hint}"
    elif _text(file.attrs["format"]) != FORMAT:
        found = _text(file.attrs["format"])
        problem = f"{path} is not a spikealign spike log (format {found!r}); {hint}"
    elif not isinstance(file.attrs.get("version"), int | np.integer):
        problem = f"{path} is a damaged spike log (no integer 'version' attribute); {hint}"
    elif file.attrs["version"] > VERSION:
        problem = (
            f"{path} is spike log version {int(file.attrs['version'])}, newer than this "
            f"spikealign reads (up to {VERSION}); upgrade spikealign to read it"
        )
    elif file.attrs["version"] < 1:
        problem = f"{path} is a damaged spike log (version {file.attrs['version']}); {hint}"
    if problem:
        file.close()
        raise UserError(problem)
    return file


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _check_stored(dataset: h5py.Dataset, count: int, where: str) -> None:
    """``count`` entries must fit in what the file stores for the dataset (compressed at most
    ~1032:1 by deflate, plus one chunk of fill values): no unbounded read of unwritten space."""
    chunk = int(np.prod(dataset.chunks)) if dataset.chunks else 0
    stored = dataset.id.get_storage_size()
    if (count - chunk) * dataset.dtype.itemsize > _MAX_COMPRESSION * stored:
        raise _Damaged(f"/{where} claims {count} entries but the file stores only {stored} bytes")


class _Damaged(Exception):
    """Internal: what is wrong with a log; SpikeLog turns it into a UserError naming the file."""


class SpikeLog:
    """Read a spike log (complete or ``.partial``); use as a context manager.

    Metadata are attributes: ``version``, ``sizes``, ``layer_names``, ``fc_names``, ``dt`` (s),
    ``seed``, ``created``, ``params`` (dict), ``complete`` (bool) and ``simulated_until`` (s).
    Data come from methods; layers and fc matrices are given by index or name ("L0", "fc1").

    Everything read is checked before it is returned: sizes against the attributes before any
    array is read (memory stays bounded by what the attributes allow), HDF5's fletcher32
    checksums, neuron and fc indices in range, times finite and inside the flush that committed
    them. A log that fails a check raises a one-line UserError saying it is damaged.
    Version 2 logs return exactly the data their last commit covers (what the writer had
    flushed); data a writer was adding when it died are ignored.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = _open_file(self.path)
        try:
            self._read_metadata()
        except (_Damaged, KeyError, OSError, ValueError, TypeError) as err:
            self._file.close()
            raise self._damaged(err) from None

    def _damaged(self, err: BaseException) -> UserError:
        what = str(err) if isinstance(err, _Damaged) else f"{type(err).__name__}: {err}"
        what = " ".join(what.split())  # one line
        holder = lock_holder(lock_path(self.path))
        if holder is not None and self.path.name.endswith(PARTIAL_SUFFIX):
            return UserError(
                f"{self.path} is being written (process {holder}) and changed while it was read "
                f"({what}); try again"
            )
        return UserError(
            f"{self.path} is a damaged spike log: {what}; write it again with {WRITTEN_BY}"
        )

    def _read_metadata(self) -> None:
        attrs = self._file.attrs
        self.version = int(attrs["version"])
        sizes = np.asarray(attrs["sizes"])
        if sizes.ndim != 1 or len(sizes) < 2 or sizes.dtype.kind not in "iu" or sizes.min() < 1:
            raise _Damaged(f"attribute sizes = {sizes.tolist()} is not >= 2 positive integers")
        self.sizes = tuple(int(size) for size in sizes)
        self.layer_names = [_text(name) for name in np.atleast_1d(attrs["layer_names"])]
        self.fc_names = [_text(name) for name in np.atleast_1d(attrs["fc_names"])]
        if self.layer_names != layer_names(self.sizes) or self.fc_names != fc_names(self.sizes):
            raise _Damaged(
                f"attributes layer_names {self.layer_names} / fc_names {self.fc_names} do not "
                f"match sizes {list(self.sizes)}"
            )
        self.dt = float(attrs["dt"])
        if not (math.isfinite(self.dt) and self.dt > 0):
            raise _Damaged(f"attribute dt = {self.dt} is not a positive time step")
        self.seed = int(attrs["seed"])
        self.created = _text(attrs["created"])
        self.params = json.loads(_text(attrs["params_json"]))
        for name in self.layer_names:
            for group in ("layers", "windows"):
                if f"{group}/{name}" not in self._file:
                    raise _Damaged(f"/{group}/{name} is missing")
        for fc, name in enumerate(self.fc_names):  # the matrices' shapes must agree with sizes
            group = self._file.get(f"weights/{name}")
            shape = (self.sizes[fc + 1], self.sizes[fc])
            for key in WEIGHT_NAMES if group is not None else ():
                if key in group and group[key].shape != shape:
                    raise _Damaged(
                        f"/weights/{name}/{key} has shape {group[key].shape}, but sizes say {shape}"
                    )
        if self.version == 1:
            status = self._file["status"].attrs
            self.complete = bool(status["complete"])
            self.simulated_until = float(status["simulated_until"])
            self._commits = None
        else:
            self._read_commits()
        if not (math.isfinite(self.simulated_until) and self.simulated_until >= 0):
            raise _Damaged(f"simulated_until = {self.simulated_until} s")
        self._file_size = self.path.stat().st_size

    def _read_commits(self) -> None:
        commits = self._file[COMMITS]
        columns = [_text(column) for column in commits.attrs["columns"]]
        weights = [_text(key) for key in commits.attrs["weights"]]
        if commits.ndim != 1 or commits.dtype != commit_dtype(len(columns), len(weights)):
            raise _Damaged(f"/{COMMITS} has dtype {commits.dtype}, not a commit table")
        if commits.shape[0] * commits.dtype.itemsize > self.path.stat().st_size:
            raise _Damaged(f"/{COMMITS} claims {commits.shape[0]} rows, more than the file holds")
        rows = commits[()]
        if len(rows) == 0:
            raise _Damaged("nothing was committed (the writer died while creating the file)")
        until, starts, ends = rows["simulated_until"], rows["start"], rows["end"]
        previous_ends = np.vstack([np.zeros((1, len(columns)), np.int64), ends[:-1]])
        if (
            not np.all(np.isfinite(until))
            or np.any(np.diff(until) < 0)
            or np.any(starts > ends)
            or np.any((ends > starts) & (starts < previous_ends))
            or np.any(ends < previous_ends)
            or np.any(rows["complete"][:-1] != 0)
        ):
            raise _Damaged(f"/{COMMITS} is not a consistent sequence of commits")
        for index, column_path in enumerate(columns):
            dataset = self._file.get(column_path)
            if not isinstance(dataset, h5py.Dataset) or dataset.ndim != 1:
                raise _Damaged(f"/{column_path} is missing")
            if ends[-1, index] > dataset.shape[0]:
                raise _Damaged(
                    f"/{column_path} holds {dataset.shape[0]} entries, fewer than the "
                    f"{ends[-1, index]} committed"
                )
        self._commits = rows
        self._columns = {column: index for index, column in enumerate(columns)}
        self._weight_keys = weights
        self.complete = bool(rows["complete"][-1])
        self.simulated_until = float(until[-1])

    # -- raw tables -----------------------------------------------------------------------------

    def _limit(self, column_path: str, itemsize: int) -> int:
        """Most entries a column can honestly hold: bounds memory before anything is read."""
        group, _, _ = column_path.rpartition("/")
        kind, _, name = group.partition("/")
        if kind in ("layers", "windows") and name in self.layer_names:
            # at most one spike (or window) per neuron and time step
            steps = math.ceil(self.simulated_until / self.dt) + 1
            return self.sizes[self.layer_names.index(name)] * steps
        return _MAX_COMPRESSION * self._file_size // itemsize + 1

    def _column(self, column_path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(values, counts, lower, upper): the committed entries of a column, and per flush
        that added entries their number and the start and end of the simulated time it covered."""
        try:
            dataset = self._file[column_path]
        except KeyError:
            raise _Damaged(f"/{column_path} is missing") from None
        if not isinstance(dataset, h5py.Dataset) or dataset.ndim != 1:
            raise _Damaged(f"/{column_path} is not a 1-D dataset")
        if self._commits is None:  # version 1: the whole dataset, flushed up to simulated_until
            count = dataset.shape[0]
            self._check_count(column_path, count, dataset)
            values = dataset[()]
            return values, np.array([count]), np.zeros(1), np.array([self.simulated_until])
        index = self._columns.get(column_path)
        if index is None:
            raise _Damaged(f"/{column_path} is not in the commit table")
        rows = self._commits
        starts, ends = rows["start"][:, index], rows["end"][:, index]
        counts = ends - starts
        self._check_count(column_path, int(counts.sum()), dataset)
        until = rows["simulated_until"]
        flush_start = np.concatenate([[0.0], until[:-1]])
        nonempty = np.flatnonzero(counts)
        if len(nonempty) == 0:
            empty = np.zeros(0)
            return np.zeros(0, dataset.dtype), empty.astype(np.int64), empty, empty
        first, last = int(starts[nonempty[0]]), int(ends[nonempty[-1]])
        span = dataset[first:last]  # holes between flushes are shorter than a chunk each
        values = np.concatenate([span[starts[k] - first : ends[k] - first] for k in nonempty])
        return values, counts[nonempty], flush_start[nonempty], until[nonempty]

    def _check_count(self, column_path: str, count: int, dataset: h5py.Dataset) -> None:
        limit = self._limit(column_path, dataset.dtype.itemsize)
        if count > limit:
            raise _Damaged(
                f"/{column_path} claims {count} entries, more than the {limit} its attributes allow"
            )
        _check_stored(dataset, count, column_path)

    def _table(self, group_path: str, columns: dict) -> dict[str, np.ndarray]:
        """Read and check a table; a damaged log raises a one-line UserError."""
        try:
            table, bounds = {}, None
            for column, dtype in columns.items():
                values, counts, lower, upper = self._column(f"{group_path}/{column}")
                if values.dtype != np.dtype(dtype):
                    raise _Damaged(f"/{group_path}/{column} has dtype {values.dtype}")
                if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
                    raise _Damaged(f"/{group_path}/{column} holds NaN or infinite values")
                if table and len(values) != len(next(iter(table.values()))):
                    raise _Damaged(f"the columns of /{group_path} have different lengths")
                table[column] = values
                if _time_column(f"{group_path}/{column}"):
                    bounds = (column, counts, lower, upper)
            if bounds is not None:
                column, counts, lower, upper = bounds
                values = table[column]
                if len(values):  # every entry inside the time its flush covered
                    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
                    low = np.minimum.reduceat(values, offsets) < lower - self.dt
                    high = np.maximum.reduceat(values, offsets) > upper + self.dt
                    if low.any() or high.any():
                        flush = int(np.flatnonzero(low | high)[0])
                        piece = values[offsets[flush] : offsets[flush] + counts[flush]]
                        outside = (piece < lower[flush] - self.dt) | (
                            piece > upper[flush] + self.dt
                        )
                        first = int(offsets[flush] + np.flatnonzero(outside)[0])
                        raise _Damaged(
                            f"/{group_path}/{column}[{first}] = {values[first]:g} s lies outside "
                            f"the {lower[flush]:g}..{upper[flush]:g} s its flush covered"
                        )
            return table
        except (_Damaged, KeyError, OSError, ValueError) as err:
            raise self._damaged(err) from None

    def _check_index(self, values: np.ndarray, size: int, what: str) -> None:
        if len(values) and (values.min() < 0 or values.max() >= size):
            bad = int(np.flatnonzero((values < 0) | (values >= size))[0])
            raise self._damaged(_Damaged(f"{what}[{bad}] = {values[bad]} is not in 0..{size - 1}"))

    def layer_index(self, layer: int | str) -> int:
        """Index of a layer given by index or name."""
        return _resolve(layer, self.layer_names, "layer", str(self.path))

    def fc_index(self, fc: int | str) -> int:
        """Index of an fc matrix given by index (0 is fc1) or name."""
        return _resolve(fc, self.fc_names, "fc matrix", str(self.path))

    def spike_count(self, layer: int | str) -> int:
        """Number of spikes of one layer (without reading them)."""
        column_path = f"layers/{self.layer_names[self.layer_index(layer)]}/spike_indices"
        try:
            if self._commits is not None:
                index = self._columns[column_path]
                return int(
                    np.sum(self._commits["end"][:, index] - self._commits["start"][:, index])
                )
            return int(self._file[column_path].shape[0])
        except KeyError as err:
            raise self._damaged(err) from None

    def spikes(self, layer: int | str) -> tuple[np.ndarray, np.ndarray]:
        """(times in s float64, neuron indices int32) of all spikes of one layer."""
        l = self.layer_index(layer)
        table = self._table(f"layers/{self.layer_names[l]}", SPIKE_COLUMNS)
        self._check_index(table["spike_indices"], self.sizes[l], f"/layers/{self.layer_names[l]}")
        return table["spike_times"], table["spike_indices"]

    def windows(self, layer: int | str) -> dict[str, np.ndarray]:
        """RDD window events of one layer: neuron, start, end (s), u_max, spiked (bool)."""
        l = self.layer_index(layer)
        where = f"/windows/{self.layer_names[l]}"
        table = self._table(where[1:], WINDOW_COLUMNS)
        self._check_index(table["neuron"], self.sizes[l], f"{where}/neuron")
        if np.any(table["start"] > table["end"]) or np.any(table["spiked"] > 1):
            raise self._damaged(_Damaged(f"{where} holds a window ending before it starts"))
        table["spiked"] = table["spiked"].astype(bool)
        return table

    def schedule(self) -> dict[str, np.ndarray]:
        """Schedule rows: driven layer index, start and end (s); one row per driven layer, so a
        segment driving several layers has several rows with equal start and end."""
        table = self._table("schedule", SCHEDULE_COLUMNS)
        self._check_index(table["layer"], len(self.sizes), "/schedule/layer")
        if np.any(table["start"] >= table["end"]):
            raise self._damaged(_Damaged("/schedule holds a segment ending before it starts"))
        return table

    def alignment(self) -> dict[str, np.ndarray]:
        """Alignment records: time (s), fc (0 is fc1), angle_deg, sign_agreement, norm_ratio."""
        table = self._table("alignment", ALIGNMENT_COLUMNS)
        self._check_index(table["fc"], len(self.fc_names), "/alignment/fc")
        return table

    def criterion(self) -> dict[str, np.ndarray]:
        """Criterion records: time (s), fc (0 is fc1), predicted_sign_agreement (%); empty in a
        version 1 log, which has no such table."""
        if self.version < 2:
            return {name: np.zeros(0, dtype) for name, dtype in CRITERION_COLUMNS.items()}
        return self._table("criterion", CRITERION_COLUMNS)

    def schedule_kind(self) -> str | None:
        """The phase's schedule ("reference", "adaptive") from its parameters; None if unknown.
        Logs of version 1 predate the choice and ran the reference schedule."""
        config = self.params.get("config") if isinstance(self.params, dict) else None
        if isinstance(config, dict) and "schedule" in config:
            return str(config["schedule"])
        return "reference" if self.version < 2 and isinstance(config, dict) else None

    def weights(self, fc: int | str) -> dict[str, np.ndarray]:
        """The matrices written for one fc (any of W, Y_before, Y_after, beta), out x in float32."""
        index = self.fc_index(fc)
        name = self.fc_names[index]
        shape = (self.sizes[index + 1], self.sizes[index])
        try:
            if self._commits is not None:
                written = self._commits["weights"][-1]
                present = [
                    key for key in WEIGHT_NAMES if written[self._weight_keys.index(f"{name}/{key}")]
                ]
            else:
                group = self._file.get(f"weights/{name}")
                present = [] if group is None else [key for key in WEIGHT_NAMES if key in group]
            matrices = {}
            for key in present:
                dataset = self._file[f"weights/{name}/{key}"]
                if dataset.shape != shape:
                    raise _Damaged(f"/weights/{name}/{key} has shape {dataset.shape}, not {shape}")
                _check_stored(dataset, dataset.size, f"weights/{name}/{key}")
                matrices[key] = dataset[()]
            return matrices
        except (_Damaged, KeyError, OSError, ValueError) as err:
            raise self._damaged(err) from None

    # -- derived --------------------------------------------------------------------------------

    def simulated_seconds(self, layer: int | str) -> float:
        """Time the layer was simulated: schedule segments driving it or a layer below it, each
        segment counted once (however many layers it drove).

        A log without schedule segments counts the whole ``simulated_until``.
        """
        l = self.layer_index(layer)
        schedule = self.schedule()
        if len(schedule["layer"]) == 0:
            return self.simulated_until
        simulated = schedule["layer"] <= l
        segments = np.unique(
            np.stack([schedule["start"][simulated], schedule["end"][simulated]]), axis=1
        )
        return float(np.sum(segments[1] - segments[0]))

    def rates(self, layer: int | str) -> np.ndarray:
        """Per-neuron firing rate (Hz) over :meth:`simulated_seconds`; NaN if that is 0."""
        l = self.layer_index(layer)
        _, indices = self.spikes(l)
        counts = np.bincount(indices, minlength=self.sizes[l]).astype(np.float64)
        seconds = self.simulated_seconds(l)
        return counts / seconds if seconds > 0 else np.full(self.sizes[l], np.nan)

    def summary(self) -> dict[str, Any]:
        """Everything ``python -m sims.inspect`` prints, as plain Python values."""
        layers = []
        for l, name in enumerate(self.layer_names):
            rates = self.rates(l)
            windows = self.windows(l)
            per_neuron = np.bincount(windows["neuron"], minlength=self.sizes[l])
            layers.append(
                {
                    "name": name,
                    "size": self.sizes[l],
                    "spikes": self.spike_count(l),
                    "simulated_s": self.simulated_seconds(l),
                    "mean_rate_hz": float(np.mean(rates)),
                    "max_rate_hz": float(np.max(rates)),
                    "windows": None
                    if len(windows["neuron"]) == 0
                    else {
                        "total": int(len(windows["neuron"])),
                        "per_neuron_mean": float(per_neuron.mean()),
                        "per_neuron_min": int(per_neuron.min()),
                        "per_neuron_max": int(per_neuron.max()),
                        "share_spiked": float(windows["spiked"].mean()),
                    },
                }
            )
        schedule = self.schedule()
        segments = [
            {"layer": self.layer_names[layer], "start": float(start), "end": float(end)}
            for layer, start, end in zip(
                schedule["layer"], schedule["start"], schedule["end"], strict=True
            )
        ]
        criterion = self.criterion()
        records = self.alignment()
        alignment = {}
        for fc, name in enumerate(self.fc_names):
            rows = np.flatnonzero(records["fc"] == fc)
            alignment[name] = None
            if len(rows):
                alignment[name] = {
                    which: {
                        key: float(records[key][row])
                        for key in ("time", "angle_deg", "sign_agreement", "norm_ratio")
                    }
                    for which, row in (("first", rows[0]), ("last", rows[-1]))
                }
        return {
            "path": str(self.path),
            "format": FORMAT,
            "version": self.version,
            "created": self.created,
            "complete": self.complete,
            "simulated_until": self.simulated_until,
            "sizes": list(self.sizes),
            "dt": self.dt,
            "seed": self.seed,
            "layers": layers,
            "schedule_kind": self.schedule_kind(),
            "schedule": segments,
            "criterion": [
                {
                    "time": float(time),
                    "fc": self.fc_names[fc],
                    "predicted_sign_agreement": float(value),
                }
                for time, fc, value in zip(
                    criterion["time"],
                    criterion["fc"],
                    criterion["predicted_sign_agreement"],
                    strict=True,
                )
            ],
            "alignment": alignment,
        }

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SpikeLog:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close()


def open_log(path: str | os.PathLike) -> SpikeLog:
    """Open a spike log for reading (``with open_log(path) as log: ...``)."""
    return SpikeLog(path)


# -- plots --------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    # A bare Figure draws with the Agg canvas when saved to PNG: no pyplot, no global backend.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    figure.savefig(path, dpi=100)
    return path


def plot_raster(
    log: SpikeLog, path: str | os.PathLike, max_spikes_per_layer: int = 50_000, seed: int = 0
) -> Path:
    """Spike raster, one panel per layer (top layer on top), driven segments shaded.

    Layers with more than ``max_spikes_per_layer`` spikes show a uniform random subsample.
    """
    rng = np.random.default_rng(seed)
    schedule = log.schedule()
    n_layers = len(log.layer_names)
    figure = _figure(10, 1.2 + 1.8 * n_layers)
    axes = figure.subplots(n_layers, 1, sharex=True, squeeze=False)[:, 0]
    end_time = log.simulated_until
    for panel, l in zip(axes, reversed(range(n_layers)), strict=True):
        times, indices = log.spikes(l)
        shown = len(times)
        if shown > max_spikes_per_layer:
            keep = rng.choice(len(times), max_spikes_per_layer, replace=False)
            times, indices, shown = times[keep], indices[keep], max_spikes_per_layer
        panel.scatter(times, indices, s=1.0, c="black", linewidths=0, rasterized=True)
        driven = schedule["layer"] == l
        for start, end in zip(schedule["start"][driven], schedule["end"][driven], strict=True):
            panel.axvspan(start, end, color="tab:orange", alpha=0.15, linewidth=0)
        total = log.spike_count(l)
        note = f"{total} spikes" if shown == total else f"{shown} of {total} spikes shown"
        panel.set_title(f"{log.layer_names[l]} ({log.sizes[l]} neurons): {note}", fontsize=9)
        panel.set_ylabel("neuron")
        panel.set_ylim(-0.5, log.sizes[l] - 0.5)
        if len(times):
            end_time = max(end_time, float(times.max()))
    axes[-1].set_xlabel("simulated time (s)  [shaded: layer noise-driven]")
    axes[-1].set_xlim(0, end_time if end_time > 0 else 1.0)
    return _save(figure, path)


def plot_rates(log: SpikeLog, path: str | os.PathLike, bins: int = 40) -> Path:
    """Histogram of per-neuron firing rates, one panel per layer."""
    n_layers = len(log.layer_names)
    figure = _figure(3.2 * n_layers, 3)
    axes = figure.subplots(1, n_layers, squeeze=False)[0]
    for panel, name in zip(axes, log.layer_names, strict=True):
        rates = log.rates(name)
        if np.all(np.isnan(rates)):
            panel.text(0.5, 0.5, "not simulated", ha="center", transform=panel.transAxes)
        else:
            panel.hist(rates, bins=bins, color="tab:blue")
            panel.axvline(rates.mean(), color="tab:red", label=f"mean {rates.mean():.2f} Hz")
            panel.legend(fontsize=8)
        panel.set_title(f"{name} ({log.sizes[log.layer_index(name)]} neurons)", fontsize=9)
        panel.set_xlabel("firing rate (Hz)")
    axes[0].set_ylabel("neurons")
    return _save(figure, path)


def plot_alignment(log: SpikeLog, path: str | os.PathLike) -> Path:
    """Angle and sign agreement between W and Y over simulated time, one line per fc matrix."""
    records = log.alignment()
    figure = _figure(10, 3.5)
    angle_panel, sign_panel = figure.subplots(1, 2)
    for fc, name in enumerate(log.fc_names):
        rows = records["fc"] == fc
        if rows.any():
            time = records["time"][rows]
            angle_panel.plot(time, records["angle_deg"][rows], marker=".", label=name)
            sign_panel.plot(time, records["sign_agreement"][rows], marker=".", label=name)
    for panel, label in ((angle_panel, "angle W vs Y (deg)"), (sign_panel, "sign agreement (%)")):
        panel.set_xlabel("simulated time (s)")
        panel.set_ylabel(label)
        if len(records["fc"]):
            panel.legend(fontsize=8)
        else:
            panel.text(0.5, 0.5, "no alignment records", ha="center", transform=panel.transAxes)
    return _save(figure, path)


def plot_criterion(log: SpikeLog, path: str | os.PathLike) -> Path:
    """The schedule that was run (driven fc per segment) and, per fc matrix, the stopping
    criterion (predicted sign agreement, solid) beside the measured sign agreement (dashed)."""
    schedule, criterion, records = log.schedule(), log.criterion(), log.alignment()
    figure = _figure(10, 5)
    schedule_panel, value_panel = figure.subplots(
        2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 3]}
    )
    colors = [f"C{fc}" for fc in range(len(log.fc_names))]
    for layer, start, end in zip(
        schedule["layer"], schedule["start"], schedule["end"], strict=True
    ):
        fc = int(layer)  # the driven layer l estimates fc(l + 1), index l
        if fc < len(log.fc_names):
            schedule_panel.barh(fc, end - start, left=start, color=colors[fc], edgecolor="white")
    schedule_panel.set_yticks(range(len(log.fc_names)), log.fc_names)
    schedule_panel.invert_yaxis()
    kind = log.schedule_kind() or "unknown"
    schedule_panel.set_title(
        f"schedule ({kind}): the fc matrix estimated in each segment", fontsize=9
    )
    for fc, name in enumerate(log.fc_names):
        rows = criterion["fc"] == fc
        if rows.any():
            value_panel.plot(
                criterion["time"][rows],
                criterion["predicted_sign_agreement"][rows],
                marker=".",
                color=colors[fc],
                label=f"{name} predicted",
            )
        rows = records["fc"] == fc
        if rows.any():
            value_panel.plot(
                records["time"][rows],
                records["sign_agreement"][rows],
                linestyle="--",
                color=colors[fc],
                label=f"{name} measured (vs W)",
            )
    config = log.params.get("config", {}) if isinstance(log.params, dict) else {}
    if kind == "adaptive" and "target" in config:
        value_panel.axhline(config["target"], color="grey", linewidth=0.8, label="target")
    if not len(criterion["fc"]):
        value_panel.text(
            0.5, 0.5, "no criterion records (lms, or a version 1 log)", ha="center",
            transform=value_panel.transAxes,
        )  # fmt: skip
    value_panel.set_xlabel("simulated time (s)")
    value_panel.set_ylabel("sign agreement (%)")
    value_panel.legend(fontsize=7, ncol=2)
    return _save(figure, path)
