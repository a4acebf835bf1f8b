"""HDF5 spike log of the spiking feedback-training phase (schema version 2).

One file holds one phase: the spikes of every LIF layer, the RDD window events of the noise-driven
layers, the drive schedule that was run, the alignment between forward weights W and feedback Y as
the run goes, the stopping criterion (predicted sign agreement) after every segment, and at the
end W, Y before/after and the causal-effect estimates beta of every fully connected weight matrix.
The layout is documented as a table in docs/spikelog.md. Version 2 added ``/criterion``; the reader
opens version 1 logs too and gives them an empty criterion table.

Writing (:class:`SpikeLogWriter`) is crash-safe in two steps:

- Appends are buffered in memory and reach the file only in :meth:`SpikeLogWriter.flush`, which
  appends them to resizable, chunked, gzip-compressed datasets (cost O(new data)), records
  ``/status`` ``simulated_until`` and calls HDF5's flush. Between two flushes the file is not
  touched, so a process that dies there leaves a file that is exactly the state of the last flush.
- The writer writes ``X.h5.partial`` and renames it to ``X.h5`` (os.replace) only when
  :meth:`SpikeLogWriter.close` has marked it ``complete``. A finished log is therefore complete; a
  crashed run leaves ``X.h5.partial``, which opens and says where it ends.

Reading (:class:`SpikeLog`, :func:`open_log`) checks the file first and turns every problem
(missing, not HDF5, truncated, foreign, newer version) into a one-line
:class:`~spikealign.errors.UserError`. The reader opens without HDF5 file locking, so a running
phase's ``.partial`` log can be inspected between its flushes.

Firing rates: rate_i = (spikes of neuron i) / T_l, where T_l is the time layer l was simulated: the
total length of the schedule segments in which l was the driven layer or above it (a layer below
the driven one gets no input, METHOD.md section 2).

Plots (:func:`plot_raster`, :func:`plot_rates`, :func:`plot_alignment`) take a SpikeLog and a PNG
path and draw with matplotlib's Agg canvas.
"""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from spikealign.errors import UserError

FORMAT = "spikealign.spikelog"
VERSION = 2
PARTIAL_SUFFIX = ".partial"
WRITTEN_BY = "python -m sims.rdd_phase --log"

# 32768 elements = 256 KiB of float64 per chunk: ~30 chunks for 1e6 spikes, within HDF5's
# recommended 10 KiB - 1 MiB chunk size, and a small compressed chunk for near-empty datasets.
CHUNK_ELEMENTS = 32768
_COMPRESSION = {"compression": "gzip", "compression_opts": 4, "shuffle": True}

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


class SpikeLogWriter:
    """Write one phase's spike log; use as a context manager.

    ``SpikeLogWriter(path, sizes, dt, params, seed)`` creates ``path + ".partial"`` with the full
    (empty) layout. The ``append_*`` methods and :meth:`write_weights` queue data in memory;
    :meth:`flush` writes the queue and the simulated time it covers; :meth:`close` flushes, marks
    the log complete and renames it to ``path``. Leaving the ``with`` block on an exception closes
    the file without writing the queue, so the ``.partial`` file holds the last flushed state.
    Layers and fc matrices are given by index or name ("L0", "fc1").
    """

    def __init__(
        self, path: str | os.PathLike, sizes: list[int], dt: float, params: dict, seed: int
    ):
        self.path = Path(path)
        self.partial_path = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        if len(sizes) < 2 or any(int(size) != size or size < 1 for size in sizes):
            raise UserError(f"spike log sizes must be >= 2 positive integers, got {list(sizes)}")
        if not dt > 0:
            raise UserError(f"spike log dt must be a positive time step in seconds, got {dt}")
        self.sizes = tuple(int(size) for size in sizes)
        self.layer_names = layer_names(self.sizes)
        self.fc_names = fc_names(self.sizes)
        self.simulated_until = 0.0
        self._pending: dict[str, list[np.ndarray]] = {}  # dataset path -> queued parts
        self._pending_weights: dict[tuple[str, str], np.ndarray] = {}  # ("fc1", "W") -> matrix
        params_text = _params_json(params)
        self.partial_path.parent.mkdir(parents=True, exist_ok=True)
        self._file: h5py.File | None = h5py.File(self.partial_path, "w")
        try:
            self._create_layout(float(dt), params_text, int(seed))
            self._file.flush()
        except BaseException:
            self._file.close()
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
        for group_path, columns in tables:
            group = file.require_group(group_path)
            for column, dtype in columns.items():
                group.create_dataset(
                    column,
                    shape=(0,),
                    maxshape=(None,),
                    dtype=dtype,
                    chunks=(CHUNK_ELEMENTS,),
                    **_COMPRESSION,
                )
        file.create_group("weights")
        status = file.create_group("status")
        status.attrs["simulated_until"] = np.float64(0.0)
        status.attrs["complete"] = np.int8(0)

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
        elif np.issubdtype(dtype, np.floating) and not np.all(np.isfinite(array)):
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
        """Queue one schedule segment: ``layer`` was noise-driven from ``start`` to ``end`` (s)."""
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
        """Queue the given matrices of one fc (out x in, stored float32); a repeat replaces."""
        self._check_open()
        fc = _resolve(fc_name, self.fc_names, "fc matrix", "write_weights")
        shape = (self.sizes[fc + 1], self.sizes[fc])
        given = {"W": W, "Y_before": Y_before, "Y_after": Y_after, "beta": beta}
        for name, matrix in given.items():
            if matrix is None:
                continue
            matrix = np.array(matrix, dtype=np.float32)  # a copy, written at the next flush()
            if matrix.shape != shape:
                raise UserError(
                    f"write_weights {self.fc_names[fc]} {name} has shape {matrix.shape}, "
                    f"expected {shape} (out x in)"
                )
            self._pending_weights[self.fc_names[fc], name] = matrix

    # -- writing --------------------------------------------------------------------------------

    def flush(self, simulated_until: float) -> None:
        """Write everything queued, record that the log covers time 0..simulated_until (s)."""
        self._check_open()
        simulated_until = float(simulated_until)
        if not simulated_until >= self.simulated_until:
            raise UserError(
                f"flush simulated_until={simulated_until} s goes back before the last flushed "
                f"{self.simulated_until} s"
            )
        file = self._file
        for dataset_path, parts in self._pending.items():
            new = parts[0] if len(parts) == 1 else np.concatenate(parts)
            dataset = file[dataset_path]
            old_length = dataset.shape[0]
            dataset.resize((old_length + len(new),))
            dataset[old_length:] = new
        self._pending.clear()
        for (fc_name, name), matrix in self._pending_weights.items():
            group = file.require_group(f"weights/{fc_name}")
            if name in group:
                del group[name]
            group.create_dataset(name, data=matrix, **_COMPRESSION)
        self._pending_weights.clear()
        file["status"].attrs.modify("simulated_until", np.float64(simulated_until))
        file.flush()
        _fsync(self.partial_path)
        self.simulated_until = simulated_until

    def close(self, simulated_until: float | None = None) -> Path:
        """Flush, mark the log complete and rename it to ``path``; returns ``path``."""
        if self._file is None:
            return self.path
        self.flush(self.simulated_until if simulated_until is None else simulated_until)
        self._file["status"].attrs.modify("complete", np.int8(1))
        self._file.close()
        self._file = None
        _fsync(self.partial_path)
        os.replace(self.partial_path, self.path)
        return self.path

    def abandon(self) -> None:
        """Close without writing the queue; the ``.partial`` file keeps the last flushed state."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> SpikeLogWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()


def _fsync(path: Path) -> None:
    """Push the file's written pages to disk (HDF5's flush only hands them to the OS)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# -- reading ------------------------------------------------------------------------------------


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
        # No locking: the writer only touches the file inside flush(), so a running phase's
        # .partial log is consistent between flushes and can be read.
        file = h5py.File(path, "r", locking=False)
    except OSError as err:
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
    if problem:
        file.close()
        raise UserError(problem)
    return file


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SpikeLog:
    """Read a spike log (complete or ``.partial``); use as a context manager.

    Metadata are attributes: ``version``, ``sizes``, ``layer_names``, ``fc_names``, ``dt`` (s),
    ``seed``, ``created``, ``params`` (dict), ``complete`` (bool) and ``simulated_until`` (s).
    Data come from methods, each reading its datasets whole; layers and fc matrices are given by
    index or name ("L0", "fc1").
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = _open_file(self.path)
        try:
            attrs = self._file.attrs
            self.version = int(attrs["version"])
            self.sizes = tuple(int(size) for size in attrs["sizes"])
            self.layer_names = [_text(name) for name in attrs["layer_names"]]
            self.fc_names = [_text(name) for name in attrs["fc_names"]]
            self.dt = float(attrs["dt"])
            self.seed = int(attrs["seed"])
            self.created = _text(attrs["created"])
            self.params = json.loads(_text(attrs["params_json"]))
            status = self._file["status"].attrs
            self.complete = bool(status["complete"])
            self.simulated_until = float(status["simulated_until"])
        except (KeyError, OSError, ValueError, TypeError) as err:
            self._file.close()
            raise UserError(
                f"{self.path} is a damaged spike log ({type(err).__name__}: {err}); "
                f"write it again with {WRITTEN_BY}"
            ) from None

    # -- raw tables -----------------------------------------------------------------------------

    def _read(self, dataset_path: str, whole: bool = True) -> np.ndarray | h5py.Dataset:
        """A dataset's values (or, with whole=False, the dataset); UserError if unreadable."""
        try:
            dataset = self._file[dataset_path]
            return dataset[()] if whole else dataset
        except (KeyError, OSError) as err:
            raise UserError(
                f"{self.path} is a damaged spike log: cannot read /{dataset_path} "
                f"({type(err).__name__}: {err}); write it again with {WRITTEN_BY}"
            ) from None

    def _table(self, group_path: str, columns: dict) -> dict[str, np.ndarray]:
        return {column: self._read(f"{group_path}/{column}") for column in columns}

    def layer_index(self, layer: int | str) -> int:
        """Index of a layer given by index or name."""
        return _resolve(layer, self.layer_names, "layer", str(self.path))

    def fc_index(self, fc: int | str) -> int:
        """Index of an fc matrix given by index (0 is fc1) or name."""
        return _resolve(fc, self.fc_names, "fc matrix", str(self.path))

    def spike_count(self, layer: int | str) -> int:
        """Number of spikes of one layer (without reading them)."""
        name = self.layer_names[self.layer_index(layer)]
        return int(self._read(f"layers/{name}/spike_indices", whole=False).shape[0])

    def spikes(self, layer: int | str) -> tuple[np.ndarray, np.ndarray]:
        """(times in s float64, neuron indices int32) of all spikes of one layer."""
        table = self._table(f"layers/{self.layer_names[self.layer_index(layer)]}", SPIKE_COLUMNS)
        return table["spike_times"], table["spike_indices"]

    def windows(self, layer: int | str) -> dict[str, np.ndarray]:
        """RDD window events of one layer: neuron, start, end (s), u_max, spiked (bool)."""
        table = self._table(f"windows/{self.layer_names[self.layer_index(layer)]}", WINDOW_COLUMNS)
        table["spiked"] = table["spiked"].astype(bool)
        return table

    def schedule(self) -> dict[str, np.ndarray]:
        """Segments: driven layer index, start and end (s)."""
        return self._table("schedule", SCHEDULE_COLUMNS)

    def alignment(self) -> dict[str, np.ndarray]:
        """Alignment records: time (s), fc (0 is fc1), angle_deg, sign_agreement, norm_ratio."""
        return self._table("alignment", ALIGNMENT_COLUMNS)

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
        name = self.fc_names[self.fc_index(fc)]
        group = self._file.get(f"weights/{name}")
        present = [] if group is None else [key for key in WEIGHT_NAMES if key in group]
        return {key: self._read(f"weights/{name}/{key}") for key in present}

    # -- derived --------------------------------------------------------------------------------

    def simulated_seconds(self, layer: int | str) -> float:
        """Time the layer was simulated: schedule segments driving it or a layer below it.

        A log without schedule segments counts the whole ``simulated_until``.
        """
        l = self.layer_index(layer)
        schedule = self.schedule()
        if len(schedule["layer"]) == 0:
            return self.simulated_until
        simulated = schedule["layer"] <= l
        return float(np.sum(schedule["end"][simulated] - schedule["start"][simulated]))

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
