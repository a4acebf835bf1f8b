"""Tests of the HDF5 spike log: round trip, crash safety, bad files, rates, the inspect CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from sims.inspect import main as inspect_main
from spikealign.errors import UserError
from spikealign.spikelog import VERSION, SpikeLogWriter, open_log

REPO = Path(__file__).resolve().parents[1]
SIZES = [6, 4, 3, 2]
PARAMS = {"duration": 3.0, "estimator": "lms", "noise": {"rate_hz": 200.0, "share": 0.2}}


def _random_spikes(rng, size, start, end, count):
    times = np.sort(rng.uniform(start, end, count))
    return times, rng.integers(0, size, count).astype(np.int64)


def write_log(path: Path, seed: int = 0) -> dict:
    """A synthetic 3-segment log written in several appends; returns what went in."""
    rng = np.random.default_rng(seed)
    expected = {"spikes": {l: ([], []) for l in range(len(SIZES))}, "windows": {}}
    expected["alignment"] = []
    expected["criterion"] = []
    expected["weights"] = {}
    with SpikeLogWriter(path, SIZES, 1e-3, PARAMS, seed=7) as writer:
        for segment, driven in enumerate([0, 1, 1]):
            start, end = float(segment), float(segment + 1)
            writer.append_schedule(driven, start, end)
            for l, size in enumerate(SIZES):
                for half in range(2):  # two appends per segment and layer, one may be empty
                    count = 0 if (l < driven or (l == 3 and half == 0)) else 20 + 5 * l
                    times, indices = _random_spikes(rng, size, start, end, count)
                    writer.append_spikes(f"L{l}" if half else l, times, indices)  # name or index
                    expected["spikes"][l][0].append(times)
                    expected["spikes"][l][1].append(indices)
            count = 7
            windows = {
                "neuron": rng.integers(0, SIZES[driven], count),
                "start": rng.uniform(start, end, count),
                "u_max": rng.normal(1.0, 0.2, count),
                "spiked": rng.random(count) < 0.5,
            }
            windows["end"] = windows["start"] + 0.03
            writer.append_windows(driven, **windows)
            expected["windows"].setdefault(driven, []).append(windows)
            for fc in range(3):
                record = (end, fc, 90.0 - 10 * segment - fc, 50.0 + segment, 1.0 + 0.1 * fc)
                writer.append_alignment(*record)
                expected["alignment"].append(record)
            writer.append_criterion(end, f"fc{driven + 1}", 60.0 + 5 * segment)
            expected["criterion"].append((end, driven, 60.0 + 5 * segment))
            writer.flush(end)
        for fc in range(3):
            shape = (SIZES[fc + 1], SIZES[fc])
            matrices = {"W": rng.normal(size=shape), "Y_before": rng.normal(size=shape)}
            if fc < 2:  # fc3 gets no beta / Y_after: absent matrices stay absent
                matrices |= {"Y_after": rng.normal(size=shape), "beta": rng.normal(size=shape)}
            writer.write_weights(f"fc{fc + 1}", **matrices)
            expected["weights"][fc] = matrices
    return expected


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    path = tmp_path_factory.mktemp("log") / "phase.h5"
    return path, write_log(path)


def test_round_trip(written):
    path, expected = written
    assert path.exists() and not Path(str(path) + ".partial").exists()
    with open_log(path) as log:
        assert log.version == VERSION == 3
        assert log.sizes == tuple(SIZES)
        assert log.layer_names == ["L0", "L1", "L2", "L3"]
        assert log.fc_names == ["fc1", "fc2", "fc3"]
        assert log.params == PARAMS
        assert (log.seed, log.dt, log.complete, log.simulated_until) == (7, 1e-3, True, 3.0)
        for l, (times, indices) in expected["spikes"].items():
            read_times, read_indices = log.spikes(l)
            assert read_times.dtype == np.float64 and read_indices.dtype == np.int32
            np.testing.assert_array_equal(read_times, np.concatenate(times))
            np.testing.assert_array_equal(read_indices, np.concatenate(indices))
            assert log.spike_count(f"L{l}") == len(read_times)
        for l in range(len(SIZES)):
            windows = log.windows(f"L{l}")
            parts = expected["windows"].get(l, [])
            assert len(windows["neuron"]) == sum(len(part["neuron"]) for part in parts)
            for key, dtype in [("neuron", np.int32), ("start", np.float64), ("end", np.float64)]:
                assert windows[key].dtype == dtype
            assert windows["u_max"].dtype == np.float32 and windows["spiked"].dtype == bool
            for key in ("neuron", "start", "end", "spiked"):
                want = np.concatenate([part[key] for part in parts]) if parts else []
                np.testing.assert_array_equal(windows[key], want)
            if parts:
                want = np.concatenate([part["u_max"] for part in parts]).astype(np.float32)
                np.testing.assert_array_equal(windows["u_max"], want)
        schedule = log.schedule()
        np.testing.assert_array_equal(schedule["layer"], [0, 1, 1])
        np.testing.assert_array_equal(schedule["start"], [0.0, 1.0, 2.0])
        np.testing.assert_array_equal(schedule["end"], [1.0, 2.0, 3.0])
        alignment = log.alignment()
        columns = ["time", "fc", "angle_deg", "sign_agreement", "norm_ratio"]
        for column, values in zip(columns, zip(*expected["alignment"], strict=True), strict=True):
            np.testing.assert_array_equal(alignment[column], values)
        criterion = log.criterion()
        columns = ["time", "fc", "predicted_sign_agreement"]
        for column, values in zip(columns, zip(*expected["criterion"], strict=True), strict=True):
            np.testing.assert_array_equal(criterion[column], values)
        for fc, matrices in expected["weights"].items():
            read = log.weights(fc)
            assert sorted(read) == sorted(matrices)
            for name, matrix in matrices.items():
                assert read[name].dtype == np.float32 and read[name].shape == matrix.shape
                np.testing.assert_array_equal(read[name], matrix.astype(np.float32))
    with h5py.File(path, "r") as file:  # the layout promised in docs/spikelog.md
        spike_times = file["layers/L1/spike_times"]
        assert spike_times.maxshape == (None,) and spike_times.compression == "gzip"
        assert spike_times.fletcher32 and file["weights/fc1/W"].fletcher32
        assert file["weights/fc1/W"].compression == "gzip"
        commits = file["status/commits"][()]
        # one commit at creation, one per flush, the last (close) marks the log complete
        assert list(commits["simulated_until"]) == [0.0, 1.0, 2.0, 3.0, 3.0]
        assert list(commits["complete"]) == [0, 0, 0, 0, 1]
        # every flush starts its entries of a column at a chunk boundary
        chunk = spike_times.chunks[0]
        column = list(file["status/commits"].attrs["columns"]).index("layers/L1/spike_times")
        assert list(commits["start"][1:4, column]) == [0, chunk, 2 * chunk]


def test_cut_off_write_leaves_readable_partial(tmp_path):
    path = tmp_path / "cut.h5"
    script = textwrap.dedent(
        f"""
        import os
        import numpy as np
        from spikealign.spikelog import SpikeLogWriter
        writer = SpikeLogWriter({str(path)!r}, [5, 3], 1e-3, {{"duration": 9.0}}, 1)
        writer.append_spikes(0, [0.1, 0.2], [1, 4])
        writer.flush(1.0)
        writer.append_spikes(0, [1.5], [2])
        writer.append_schedule(0, 0.0, 2.0)
        writer.flush(2.0)
        writer.append_spikes(0, [2.5, 2.6, 2.7], [0, 0, 0])  # never flushed
        writer.append_schedule(0, 2.0, 3.0)
        os._exit(1)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True)
    assert result.returncode == 1, result.stderr.decode()
    partial = tmp_path / "cut.h5.partial"
    assert partial.exists() and not path.exists()
    with open_log(partial) as log:
        assert log.complete is False
        assert log.simulated_until == 2.0
        times, indices = log.spikes("L0")
        np.testing.assert_array_equal(times, [0.1, 0.2, 1.5])
        np.testing.assert_array_equal(indices, [1, 4, 2])
        assert log.summary()["complete"] is False
    with pytest.raises(UserError, match=r"cut.h5.partial does"):  # the finished name points to it
        open_log(path)


def test_partial_log_readable_while_writer_runs(tmp_path):
    path = tmp_path / "live.h5"
    script = textwrap.dedent(
        f"""
        import sys
        from spikealign.spikelog import SpikeLogWriter
        with SpikeLogWriter({str(path)!r}, [4, 2], 1e-3, {{}}, 0) as writer:
            writer.append_spikes(1, [0.5], [1])
            writer.flush(1.0)
            print("flushed", flush=True)
            sys.stdin.readline()
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert child.stdout.readline().strip() == b"flushed"
        with open_log(str(path) + ".partial") as log:
            assert (log.complete, log.simulated_until, log.spike_count(1)) == (False, 1.0, 1)
    finally:
        child.communicate(b"\n", timeout=30)
    assert child.returncode == 0
    with open_log(path) as log:
        assert log.complete and log.simulated_until == 1.0


def test_exception_in_writer_keeps_last_flush(tmp_path):
    path = tmp_path / "failed.h5"
    with pytest.raises(RuntimeError), SpikeLogWriter(path, [3, 2], 1e-3, {}, 0) as writer:
        writer.append_spikes(0, [0.1], [2])
        writer.flush(0.5)
        writer.append_spikes(0, [0.7], [1])
        raise RuntimeError("simulation failed")
    assert not path.exists()
    with open_log(str(path) + ".partial") as log:
        assert not log.complete and log.simulated_until == 0.5
        np.testing.assert_array_equal(log.spikes(0)[1], [2])


def test_queued_data_is_a_copy(tmp_path):
    # Appends reach the file at flush(); a caller reusing its buffers before then must not matter.
    path = tmp_path / "copy.h5"
    times, indices = np.array([0.1, 0.2]), np.array([1, 2], dtype=np.int32)
    with SpikeLogWriter(path, [3, 2], 1e-3, {}, 0) as writer:
        writer.append_spikes(0, times, indices)
        times[:], indices[:] = 9.0, 0
        writer.flush(1.0)
    with open_log(path) as log:
        read_times, read_indices = log.spikes(0)
    np.testing.assert_array_equal(read_times, [0.1, 0.2])
    np.testing.assert_array_equal(read_indices, [1, 2])


def test_writer_rejects_bad_input(tmp_path):
    with SpikeLogWriter(tmp_path / "bad.h5", [3, 2], 1e-3, {}, 0) as writer:
        with pytest.raises(UserError, match=r"indices must lie in 0..2 \(L0 has 3"):
            writer.append_spikes(0, [0.1], [3])
        with pytest.raises(UserError, match="has 1 entries, expected 2"):
            writer.append_spikes(0, [0.1, 0.2], [1])
        with pytest.raises(UserError, match="unknown layer 'L7'"):
            writer.append_windows("L7", [0], [0.0], [0.03], [1.0], [True])
        with pytest.raises(UserError, match=r"expected \(2, 3\) \(out x in\)"):
            writer.write_weights("fc1", W=np.zeros((3, 2)))
        with pytest.raises(UserError, match="JSON cannot store"):
            SpikeLogWriter(tmp_path / "p.h5", [3, 2], 1e-3, {"f": object()}, 0)
        writer.flush(1.0)
        with pytest.raises(UserError, match="goes back"):
            writer.flush(0.5)


def _bad_file(kind: str, tmp_path: Path, valid: Path) -> Path:
    path = tmp_path / f"{kind}.h5"
    if kind == "foreign":
        with h5py.File(path, "w") as file:
            file["data"] = np.arange(3)
    elif kind == "other-format":
        with h5py.File(path, "w") as file:
            file.attrs["format"] = "someone.else"
    elif kind == "text":
        path.write_text("time,neuron\n0.1,3\n")
    elif kind == "truncated":
        path.write_bytes(valid.read_bytes()[: valid.stat().st_size // 2])
    elif kind == "newer":
        path.write_bytes(valid.read_bytes())
        with h5py.File(path, "r+") as file:
            file.attrs["version"] = np.int64(VERSION + 1)
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("foreign", "is not a spikealign spike log (no 'format' attribute); expected a file"),
        ("other-format", "is not a spikealign spike log (format 'someone.else')"),
        ("text", "is not an HDF5 file"),
        ("truncated", "is truncated or corrupt"),
        ("missing", "does not exist; expected a file written by python -m sims.rdd_phase --log"),
        ("newer", "is spike log version 4, newer than this spikealign reads (up to 3)"),
    ],
)
def test_bad_files_give_one_line_errors(kind, message, tmp_path, written):
    path = _bad_file(kind, tmp_path, written[0])
    with pytest.raises(UserError) as error:
        open_log(path)
    text = str(error.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text


def test_rates_on_known_case(tmp_path):
    # L0 driven 0-2 s, L1 driven 2-6 s: L0 simulated 2 s, L1 and L2 6 s (L0 silent while L1 driven).
    path = tmp_path / "rates.h5"
    with SpikeLogWriter(path, [3, 2, 2], 1e-3, {}, 0) as writer:
        writer.append_schedule("L0", 0.0, 2.0)
        writer.append_spikes("L0", [0.1, 0.2, 0.3, 0.4, 1.0], [0, 0, 0, 0, 1])
        writer.append_spikes("L1", [0.5, 1.5], [0, 0])
        writer.flush(2.0)
        writer.append_schedule("L1", 2.0, 6.0)
        writer.append_spikes("L1", [3.0], [0])
        writer.append_spikes("L2", [3.0, 4.0, 5.0], [1, 1, 1])
        writer.append_windows(
            "L1", [0, 0, 0], [2.0, 3.0, 4.0], [2.03, 3.03, 4.03], [1, 1, 1], [1, 0, 0]
        )
        writer.flush(6.0)
    with open_log(path) as log:
        np.testing.assert_allclose(log.rates("L0"), [2.0, 0.5, 0.0])
        np.testing.assert_allclose(log.rates(1), [0.5, 0.0])
        np.testing.assert_allclose(log.rates("L2"), [0.0, 0.5])
        layers = log.summary()["layers"]
    assert [layer["simulated_s"] for layer in layers] == [2.0, 6.0, 6.0]
    assert layers[0]["mean_rate_hz"] == pytest.approx(2.5 / 3) and layers[0]["max_rate_hz"] == 2.0
    assert layers[0]["windows"] is None
    windows = layers[1]["windows"]
    assert (windows["per_neuron_min"], windows["per_neuron_max"]) == (0, 3)
    assert windows["per_neuron_mean"] == 1.5 and windows["share_spiked"] == pytest.approx(1 / 3)


def test_a_segment_driving_two_layers_counts_once(tmp_path, capsys):
    # 0-2 s: L0 alone; 2-4 s: L0 and L2 together (fc1 and fc3 estimated at once), one row each.
    # L1 and L3 were simulated 4 s, not 6: the shared segment counts once.
    path = tmp_path / "pair.h5"
    with SpikeLogWriter(path, [3, 2, 2, 1], 1e-3, {"config": {"schedule": "adaptive"}}, 0) as log:
        log.append_schedule("L0", 0.0, 2.0)
        log.flush(2.0)
        log.append_schedule("L0", 2.0, 4.0)
        log.append_schedule("L2", 2.0, 4.0)
        log.append_spikes("L3", [2.5, 3.5], [0, 0])
        log.flush(4.0)
    with open_log(path) as log:
        assert [log.simulated_seconds(l) for l in range(4)] == [4.0, 4.0, 4.0, 4.0]
        np.testing.assert_allclose(log.rates("L3"), [0.5])
        np.testing.assert_array_equal(log.schedule()["layer"], [0, 0, 2])
    inspect_main([str(path)])
    out = capsys.readouterr().out
    assert "schedule:  adaptive, 2 segments (driven: L0 4 s, L2 2 s)" in out
    assert "2.000 -     4.000 s  L0 + L2 driven" in out


def test_version_2_logs_still_open(tmp_path, written):
    # version 3 changed no dataset, only what equal schedule rows mean: a version 2 file is a
    # version 3 file with the old number (one driven layer per segment)
    path = tmp_path / "v2.h5"
    path.write_bytes(written[0].read_bytes())
    with h5py.File(path, "r+") as file:
        file.attrs["version"] = np.int64(2)
    with open_log(path) as log, open_log(written[0]) as current:
        assert log.version == 2
        assert log.summary() == {**current.summary(), "version": 2, "path": str(path)}


def test_inspect_prints_summary_and_plots(written, tmp_path, capsys):
    path, _ = written
    inspect_main([str(path), "--plot", str(tmp_path / "plots")])
    out = capsys.readouterr().out
    assert "format:    spikealign.spikelog version 3" in out
    assert "status:    complete, simulated until 3.000 s" in out
    assert "network:   sizes 6-4-3-2 (L0..L3), dt 1 ms, seed 7" in out
    assert "schedule:  unknown, 3 segments (driven: L0 1 s, L1 2 s)" in out
    assert "2.000 -     3.000 s  L1 driven" in out
    assert "fc2: 2 s 65.0, 3 s 70.0" in out  # the criterion after each segment
    l0_row = next(line for line in out.splitlines() if line.startswith("  L0 "))
    assert l0_row.split()[:4] == ["L0", "6", "40", "1.0"]  # driven 0-1 s only: 2 x 20 spikes
    assert "fc2: t 1.0 -> 3.0 s, angle 89.0 -> 69.0 deg, sign agreement 50.0 -> 52.0 %" in out
    for name in ("raster", "rates", "alignment", "criterion"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_inspect_reports_incomplete_log(tmp_path, capsys):
    path = tmp_path / "cut.h5"
    writer = SpikeLogWriter(path, [3, 2], 1e-3, {}, 0)
    writer.append_spikes(0, [0.1], [2])
    writer.flush(4.0)
    writer.abandon()
    inspect_main([str(path) + ".partial"])
    assert "status:    INCOMPLETE, ends at 4.000 s of simulated time" in capsys.readouterr().out


def test_inspect_bad_file_exits_2_with_one_line(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("not hdf5")
    result = subprocess.run(
        [sys.executable, "-m", "sims.inspect", str(path)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr == f"error: {path} is not an HDF5 file; expected a file written by " + (
        "python -m sims.rdd_phase --log\n"
    )
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_reads_version_1_logs():
    # tests/data/spikelog_v1.h5 was written by the version 1 writer (datasets appended in place)
    with open_log(REPO / "tests" / "data" / "spikelog_v1.h5") as log:
        assert (log.version, log.sizes, log.seed, log.complete) == (1, (4, 3, 2), 5, True)
        assert log.simulated_until == 2.0
        np.testing.assert_array_equal(log.spikes("L0")[1], [3, 0, 3])
        np.testing.assert_array_equal(log.spikes(1)[0], [0.3, 1.3, 1.4])
        np.testing.assert_array_equal(log.windows(0)["spiked"], [True])
        np.testing.assert_array_equal(log.schedule()["layer"], [0, 1])
        want = (np.arange(12).reshape(3, 4) / 10).astype(np.float32)
        np.testing.assert_array_equal(log.weights("fc1")["W"], want)
        assert sorted(log.weights("fc2")) == ["W"]
        np.testing.assert_allclose(log.rates("L0"), [1.0, 0.0, 0.0, 2.0])


def write_version_1_log(path: Path) -> None:
    """A log laid out exactly as the version 1 writer wrote it (no /criterion table)."""
    with h5py.File(path, "w") as file:
        file.attrs.update(
            {
                "format": "spikealign.spikelog",
                "version": np.int64(1),
                "created": "2026-11-01T00:00:00+00:00",
                "sizes": np.array([3, 2], np.int64),
                "layer_names": ["L0", "L1"],
                "fc_names": ["fc1"],
                "dt": 1e-3,
                "params_json": '{"config": {"duration": 2.0, "estimator": "lms"}, "sizes": [3, 2]}',
                "seed": np.int64(5),
            }
        )
        tables = {
            "layers/L0": {"spike_times": [0.1, 0.5], "spike_indices": [0, 2]},
            "layers/L1": {"spike_times": [0.2], "spike_indices": [1]},
            "windows/L0": {"neuron": [1], "start": [0.3], "end": [0.33], "u_max": [1.05],
                           "spiked": [1]},
            "windows/L1": {"neuron": [], "start": [], "end": [], "u_max": [], "spiked": []},
            "schedule": {"layer": [0], "start": [0.0], "end": [2.0]},
            "alignment": {"time": [0.0, 2.0], "fc": [0, 0], "angle_deg": [90.0, 70.0],
                          "sign_agreement": [50.0, 66.0], "norm_ratio": [1.0, 1.0]},
        }  # fmt: skip
        dtypes = {"spike_indices": np.int32, "neuron": np.int32, "fc": np.int32,
                  "layer": np.int32, "u_max": np.float32, "spiked": np.uint8}  # fmt: skip
        for group, columns in tables.items():
            for column, values in columns.items():
                file.create_dataset(
                    f"{group}/{column}",
                    data=np.asarray(values, dtypes.get(column, np.float64)),
                    maxshape=(None,),
                    chunks=(32768,),
                )
        file.create_dataset("weights/fc1/W", data=np.ones((2, 3), np.float32))
        status = file.create_group("status")
        status.attrs["simulated_until"] = np.float64(2.0)
        status.attrs["complete"] = np.int8(1)


def test_version_1_logs_still_open(tmp_path, capsys):
    path = tmp_path / "v1.h5"
    write_version_1_log(path)
    with open_log(path) as log:
        assert log.version == 1 and log.schedule_kind() == "reference"
        assert all(len(column) == 0 for column in log.criterion().values())
        np.testing.assert_array_equal(log.schedule()["end"], [2.0])
        np.testing.assert_array_equal(log.alignment()["sign_agreement"], [50.0, 66.0])
        assert log.summary()["criterion"] == []
    inspect_main([str(path), "--plot", str(tmp_path / "plots")])
    out = capsys.readouterr().out
    assert "version 1" in out and "schedule:  reference, 1 segments (driven: L0 2 s)" in out
    assert "criterion: none recorded" in out
    assert (tmp_path / "plots" / "criterion.png").stat().st_size > 5000
