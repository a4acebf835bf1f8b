"""Fault injection: writers killed at random moments, two writers on one output, bad input.

Every user mistake ends in exactly one ``error: ...`` line on stderr and exit status 2, and files
that existed before are unchanged. Subprocesses only where a separate process matters (kills,
locks, the real command line); the rest calls ``main(argv)`` in-process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from spikealign.errors import UserError
from spikealign.spikelog import SpikeLogWriter, open_log

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

# -- a writer killed at random moments ---------------------------------------------------------

#: The data of flush k (1-based) of the killed writer; exec'd by the writer and by the test.
WRITER_DATA = textwrap.dedent(
    """
    import numpy as np

    KILL_SIZES = [300, 120, 60, 10]
    KILL_FLUSHES = 12

    def flush_data(k):
        rng = np.random.default_rng(k)
        spikes = []
        for l, size in enumerate(KILL_SIZES):
            count = int(rng.integers(0, 40000 if l < 2 else 3000))
            times = np.sort(rng.uniform(k - 1, k, count))
            spikes.append((times, rng.integers(0, size, count)))
        count = int(rng.integers(1, 9000))
        start = rng.uniform(k - 1.03, k - 0.03, count)
        windows = {
            "neuron": rng.integers(0, KILL_SIZES[k % 3], count),
            "start": start,
            "end": start + 0.03,
            "u_max": rng.normal(1.0, 0.1, count),
            "spiked": rng.random(count) < 0.5,
        }
        return spikes, k % 3, windows

    def matrices(fc, which):
        rng = np.random.default_rng(100 + 4 * fc + which)
        return rng.normal(size=(KILL_SIZES[fc + 1], KILL_SIZES[fc]))
    """
)

#: A server imports once and forks one writer per request, so a kill costs no import time.
WRITER_SERVER = WRITER_DATA + textwrap.dedent(
    """
    import os, sys
    from spikealign.spikelog import SpikeLogWriter

    def write(path):
        with SpikeLogWriter(path, KILL_SIZES, 1e-3, {"kill": True}, seed=1) as log:
            for fc in range(3):
                log.write_weights(fc, W=matrices(fc, 0), Y_before=matrices(fc, 1))
            log.append_alignment(0.0, 0, 90.0, 50.0, 1.0)
            log.flush(0.0)
            for k in range(1, KILL_FLUSHES + 1):
                spikes, driven, windows = flush_data(k)
                for l, (times, indices) in enumerate(spikes):
                    log.append_spikes(l, times, indices)
                log.append_windows(driven, **windows)
                log.append_schedule(driven, k - 1.0, float(k))
                log.append_alignment(float(k), driven, 90.0 - k, 50.0 + k, 1.0)
                log.flush(float(k))
            for fc in range(3):
                log.write_weights(fc, Y_after=matrices(fc, 2), beta=matrices(fc, 3))

    print("ready", flush=True)
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            try:
                write(line.strip())
            finally:
                os._exit(0)
        print(pid, flush=True)
        os.waitpid(pid, 0)
        print("reaped", flush=True)
    """
)


def _expected(namespace, until: int, complete: bool) -> dict:
    flush_data, matrices = namespace["flush_data"], namespace["matrices"]
    sizes = namespace["KILL_SIZES"]
    spikes = [([], []) for _ in sizes]
    windows = {driven: [] for driven in range(len(sizes))}
    for k in range(1, until + 1):
        flush_spikes, driven, flush_windows = flush_data(k)
        for l, (times, indices) in enumerate(flush_spikes):
            spikes[l][0].append(times)
            spikes[l][1].append(indices)
        windows[driven].append(flush_windows)
    weights = {fc: {"W": matrices(fc, 0), "Y_before": matrices(fc, 1)} for fc in range(3)}
    if complete:
        for fc in range(3):
            weights[fc] |= {"Y_after": matrices(fc, 2), "beta": matrices(fc, 3)}
    return {"spikes": spikes, "windows": windows, "weights": weights}


def _check_log_prefix(path: Path, namespace) -> str:
    """Open a log; it must hold exactly the first simulated_until flushes. Returns a verdict."""
    try:
        log = open_log(path)
    except UserError as err:
        message = str(err)
        assert "\n" not in message
        assert "damaged" in message or "being written" in message, message
        return "refused"
    with log:
        until = log.simulated_until
        assert until == int(until) and 0 <= until <= namespace["KILL_FLUSHES"]
        if log.complete:
            assert until == namespace["KILL_FLUSHES"]
        expected = _expected(namespace, int(until), log.complete)
        for l, (times, indices) in enumerate(expected["spikes"]):
            read_times, read_indices = log.spikes(l)
            np.testing.assert_array_equal(read_times, np.concatenate([[], *times]))
            np.testing.assert_array_equal(read_indices, np.concatenate([[], *indices]))
        for l, parts in expected["windows"].items():
            windows = log.windows(l)
            for key in ("neuron", "start", "end", "spiked"):
                np.testing.assert_array_equal(
                    windows[key], np.concatenate([[], *[part[key] for part in parts]])
                )
        schedule = log.schedule()
        np.testing.assert_array_equal(schedule["end"], np.arange(1, until + 1))
        # until 0: the commit at creation (nothing yet) or that of flush(0.0) (W, Y, alignment)
        started = until > 0 or len(log.alignment()["time"]) > 0
        np.testing.assert_array_equal(log.alignment()["time"], np.arange(0, until + started))
        for fc, matrices in expected["weights"].items():
            matrices = matrices if started else {}
            read = log.weights(fc)
            assert sorted(read) == sorted(matrices)
            for key, matrix in matrices.items():
                np.testing.assert_array_equal(read[key], matrix.astype(np.float32))
        return "complete" if log.complete else f"partial@{int(until)}"


def test_writer_killed_at_random_moments_leaves_exactly_a_committed_prefix(tmp_path):
    namespace: dict = {}
    exec(WRITER_DATA, namespace)
    server = subprocess.Popen(
        [sys.executable, "-c", WRITER_SERVER],
        cwd=REPO,
        env=ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    rng = np.random.default_rng(2026)
    verdicts = []
    try:
        assert server.stdout.readline().strip() == "ready"
        # how long one uninterrupted write takes on this machine
        reference = tmp_path / "reference.h5"
        start = time.perf_counter()
        server.stdin.write(f"{reference}\n")
        server.stdin.flush()
        int(server.stdout.readline())
        assert server.stdout.readline().strip() == "reaped"
        write_s = time.perf_counter() - start
        assert _check_log_prefix(reference, namespace) == "complete"
        deadline = time.perf_counter() + 15.0
        trial = 0
        while trial < 12 or (time.perf_counter() < deadline and trial < 60):
            path = tmp_path / f"kill{trial}.h5"
            server.stdin.write(f"{path}\n")
            server.stdin.flush()
            pid = int(server.stdout.readline())
            delay = rng.uniform(0, 1.1 * write_s)
            if trial % 4 == 1:  # read the log while it is being written, then kill
                time.sleep(delay / 2)
                partial = Path(f"{path}.partial")
                if partial.exists():
                    verdicts.append(("live", _check_log_prefix(partial, namespace)))
                delay /= 2
            time.sleep(delay)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it had finished
                pass
            assert server.stdout.readline().strip() == "reaped"
            for candidate in (path, Path(f"{path}.partial")):
                if candidate.exists():
                    verdicts.append(("killed", _check_log_prefix(candidate, namespace)))
            trial += 1
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    killed = [verdict for kind, verdict in verdicts if kind == "killed"]
    partials = [verdict for verdict in killed if verdict.startswith("partial@")]
    print(f"write {write_s:.2f} s, {trial} kills:", " ".join(v for _, v in verdicts))
    # the kills landed at many different points, and no log was lost
    assert len(set(partials)) >= 4
    assert "refused" not in killed


# -- one line, exit 2, nothing changed ----------------------------------------------------------


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes."""
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def one_line_error(main, argv, capsys, directory: Path | None = None) -> str:
    """Run an entry point in-process; it must exit 2 with one ``error:`` line on stderr and
    leave the files under ``directory`` unchanged. Returns the line."""
    before = snapshot(directory) if directory is not None else None
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    if directory is not None:
        assert snapshot(directory) == before
    return err


def small_log(path: Path) -> Path:
    with SpikeLogWriter(path, [4, 3], 1e-3, {}, seed=0) as log:
        log.append_spikes(0, [0.1, 0.5], [3, 1])
        log.append_spikes(1, [0.6], [2])
        log.append_schedule(0, 0.0, 1.0)
        log.flush(1.0)
        log.write_weights(0, W=np.ones((3, 4)))
    return path


@pytest.fixture
def files(tmp_path):
    """A directory of files that exist before each bad command: a log, weights, a plain file."""
    root = tmp_path / "before"
    root.mkdir()
    small_log(root / "log.h5")
    rng = np.random.default_rng(0)
    np.savez(root / "w.npz", W1=rng.normal(size=(6, 8)), W2=rng.normal(size=(2, 6)))
    (root / "file").write_text("a file, not a directory")
    (root / "dir.h5").mkdir()
    return root


def npz(root: Path, name: str, **arrays) -> str:
    np.savez(root / name, **arrays)
    return str(root / name)


def test_rdd_phase_argument_mistakes_are_one_line(files, capsys):
    from sims import rdd_phase

    for argv, needle in [
        (["--estimator", "bogus"], "invalid choice: 'bogus'"),
        (["--duration", "ten"], "invalid float value: 'ten'"),
        (["--weights", "a.npz", "--sizes", "4,3"], "not allowed with argument"),
        (["--no-such-flag"], "unrecognized arguments"),
    ]:
        assert needle in one_line_error(rdd_phase.main, argv, capsys, files)


def test_inspect_argument_mistakes_are_one_line(files, capsys):
    from sims import inspect

    assert "required: log" in one_line_error(inspect.main, [], capsys, files)
    assert "unrecognized" in one_line_error(inspect.main, ["x.h5", "--bogus"], capsys, files)


def test_output_paths_are_checked_before_any_work(files, capsys):
    from sims import inspect, rdd_phase

    weights = ["--weights", str(files / "w.npz"), "--no-progress"]
    cases = [
        (["--log", str(files / "dir.h5")], "--log", "is a directory"),
        (["--log", str(files / "file" / "x.h5")], "--log", "is a file, not a directory"),
        (["--summary-json", str(files / "dir.h5")], "--summary-json", "is a directory"),
        (["--summary-json", str(files / "file" / "s.json")], "--summary-json", "not a directory"),
        (["--out-weights", str(files / "dir.h5")], "--out-weights", "is a directory"),
        (["--out-weights", str(files / "file" / "w.npz")], "--out-weights", "not a directory"),
        (["--cache-dir", str(files / "file")], "--cache-dir", "is a file; give a directory"),
        (["--cache-dir", str(files / "file" / "c")], "--cache-dir", "not a directory"),
    ]
    for argv, flag, needle in cases:
        start = time.perf_counter()
        err = one_line_error(rdd_phase.main, [*weights, *argv], capsys, files)
        assert flag in err and needle in err, err
        assert time.perf_counter() - start < 5  # refused before the phase ran
    log = str(files / "log.h5")
    err = one_line_error(inspect.main, [log, "--plot", str(files / "file")], capsys, files)
    assert "--plot" in err and "is a file" in err
    err = one_line_error(inspect.main, [log, "--plot", str(files / "file" / "p")], capsys, files)
    assert "not a directory" in err


def test_numbers_that_make_no_sense_are_refused(files, capsys):
    from sims import rdd_phase

    cases = [
        (["--seed", "-1"], "seed must be in [0, 2**31)"),
        (["--seed", str(2**31)], "seed must be in [0, 2**31)"),
        (["--duration", "nan"], "duration must be a positive number"),
        (["--duration", "inf"], "duration must be a positive number"),
        (["--sizes", "200000,200000,10"], "GiB of memory, more than this machine's"),
        (["--sizes", "40,20", "--duration", "1e13"], "GiB of memory, more than this machine's"),
        (["--sizes", "40,-2"], "--sizes needs at least two positive sizes"),
    ]
    for argv, needle in cases:
        assert needle in one_line_error(rdd_phase.main, [*argv, "--no-progress"], capsys, files)


def test_weights_that_cannot_be_learned_from_are_refused(files, capsys):
    from sims import rdd_phase

    rng = np.random.default_rng(1)
    W1, W2 = rng.normal(size=(6, 8)), rng.normal(size=(2, 6))
    cases = [
        (dict(W1=np.zeros((6, 8)), W2=W2), "weight of fc1 is all zero"),
        (dict(W1=W1, W2=np.full((2, 6), 3.0)), "weight of fc2 is constant"),
        (dict(W1=W1, W2=W2, Y1=np.zeros((6, 8)), Y2=W2), "feedback of fc1 is all zero"),
        (dict(W1=W1 * 1j, W2=W2), "must hold real numbers, got dtype complex128"),
        (dict(W1=W1.astype(str), W2=W2), "must hold real numbers, got dtype <U"),
        (dict(W1=W1 * 1e307, W2=W2), "too large to rescale"),
        (dict(W1=W1 * 1e-322, W2=W2), "too small to rescale"),
    ]
    for number, (arrays, needle) in enumerate(cases):
        path = npz(files.parent, f"bad{number}.npz", **arrays)
        err = one_line_error(rdd_phase.main, ["--weights", path, "--no-progress"], capsys, files)
        assert needle in err, err


def test_summary_json_is_strict_json():
    import json

    from sims.rdd_phase import json_safe

    summary = {"layers": [{"angle_deg": float("nan"), "norm_ratio": np.float64("inf")}], "s": 1.5}
    text = json.dumps(json_safe(summary), allow_nan=False)
    assert json.loads(text) == {"layers": [{"angle_deg": None, "norm_ratio": None}], "s": 1.5}


def tamper(path: Path, change) -> Path:
    import h5py

    with h5py.File(path, "r+") as file:
        change(file)
    return path


def claim(file, column: str, count: int) -> None:
    """Make the last commit claim ``count`` entries of ``column`` (and the dataset hold them)."""
    dataset = file[column]
    dataset.resize((count,))
    for other in dataset.parent.values():  # the table's columns keep one length
        other.resize((count,))
    commits = file["status/commits"]
    rows = commits[()]
    columns = [
        name.decode() if isinstance(name, bytes) else name for name in commits.attrs["columns"]
    ]
    for index, name in enumerate(columns):
        if name.startswith(column.rpartition("/")[0] + "/"):
            rows["end"][-1, index] = count
    commits[...] = rows


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda f: f.attrs.modify("sizes", np.array([4, 300])), "but sizes say (300, 4)"),
        (lambda f: f["layers/L1/spike_indices"].__setitem__(0, 3), "[0] = 3 is not in 0..2"),
        (lambda f: f.attrs.modify("layer_names", ["A", "B"]), "do not match sizes"),
        (lambda f: f.attrs.modify("dt", -1.0), "dt = -1.0"),
        (lambda f: f["layers/L0/spike_indices"].__setitem__(0, 1_860_000_000), "not in 0..3"),
        (lambda f: f["layers/L0/spike_times"].__setitem__(1, 7.0), "outside the 0..1 s"),
        (lambda f: f["schedule/layer"].__setitem__(0, 5), "/schedule/layer[0] = 5"),
        (lambda f: f["status/commits"].resize((0,)), "nothing was committed"),
        (lambda f: claim(f, "layers/L0/spike_times", 10**9), "more than the 4004 its attributes"),
        (lambda f: claim(f, "schedule/end", 5 * 10**6), "but the file stores only"),
    ],
)
def test_inconsistent_logs_are_reported_damaged(files, tmp_path, capsys, change, needle):
    from sims import inspect

    path = tamper(small_log(tmp_path / "tampered.h5"), change)
    err = one_line_error(inspect.main, [str(path)], capsys, files)
    assert "is a damaged spike log" in err and needle in err, err


def test_damaged_chunk_fails_its_checksum(tmp_path, capsys):
    from sims import inspect

    path = tmp_path / "big.h5"
    rng = np.random.default_rng(0)
    with SpikeLogWriter(path, [500, 3], 1e-3, {}, seed=0) as log:
        log.append_spikes(0, np.sort(rng.uniform(0, 1, 20000)), rng.integers(0, 500, 20000))
        log.flush(1.0)
    import h5py

    with h5py.File(path, "r") as file:
        offset = file["layers/L0/spike_times"].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as handle:  # one flipped byte inside the chunk, as a torn write would
        handle.seek(offset + 100)
        byte = handle.read(1)
        handle.seek(offset + 100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    err = one_line_error(inspect.main, [str(path)], capsys)
    assert "is a damaged spike log" in err


# -- one writer per output ----------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys
    from spikealign.outputs import OutputLock
    from spikealign.spikelog import SpikeLogWriter
    kind, path = sys.argv[1:]
    if kind == "log":
        writer = SpikeLogWriter(path, [4, 3], 1e-3, {}, seed=0)
        writer.append_spikes(0, [0.1], [1])
        writer.flush(1.0)
    else:
        lock = OutputLock(path, path, "--out")
    print("holding", flush=True)
    sys.stdin.readline()
    if kind == "log":
        writer.close()
    """
)


def hold(kind: str, path: Path) -> subprocess.Popen:
    """A separate process that owns ``path`` (a spike log, or a run directory's lock file)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, kind, str(path)],
        cwd=REPO,
        env=ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "holding"
    return holder


def test_second_writer_of_a_log_stops_at_once(tmp_path, capsys):
    from sims import rdd_phase

    log = tmp_path / "same.h5"
    holder = hold("log", log)
    try:
        argv = ["--sizes", "8,4", "--duration", "1", "--log", str(log), "--no-progress"]
        err = one_line_error(rdd_phase.main, argv, capsys, tmp_path)  # the .partial untouched
        assert err == (
            f"error: {log} is in use by another process (pid {holder.pid}); wait for it to end "
            "or choose another log path\n"
        )
        with open_log(f"{log}.partial") as reader:  # readable while it is being written
            assert reader.simulated_until == 1.0 and not reader.complete
    finally:
        holder.communicate("\n", timeout=30)
    assert holder.returncode == 0
    with open_log(log) as reader:
        assert reader.complete
    assert not (tmp_path / "same.h5.lock").exists()


def test_second_training_run_on_one_out_stops_and_killed_runs_leave_nothing(tmp_path, capsys):
    from spikealign.trainer import rundir
    from training import run as run_cli

    out = tmp_path / "run"
    out.mkdir()
    holder = hold("run", out / rundir.LOCK_FILE)
    argv = ["--dataset", "digits", "--rule", "bp", "--epochs", "1", "--device", "cpu",
            "--no-progress", "--out", str(out)]  # fmt: skip
    try:
        err = one_line_error(run_cli.main, argv, capsys, out)
        assert f"run directory {out} is in use by another process (pid {holder.pid})" in err
        assert "choose another --out" in err
        err = one_line_error(run_cli.main, ["--resume", "--out", str(out)], capsys, out)
        assert "is in use by another process" in err
    finally:
        holder.kill()
        holder.wait()
    # A temporary file of the killed process is deleted by the next owner; the lock is free.
    stale = out / f".checkpoint.pt.{holder.pid}.tmp"
    stale.write_bytes(b"half a checkpoint")
    live = out / f".metrics.csv.{os.getpid()}.tmp"
    live.write_text("being written by this process")
    with rundir.lock_run_dir(out):
        assert not stale.exists() and live.exists()


# -- training -----------------------------------------------------------------------------------

TRAIN = ["--dataset", "digits", "--rule", "fa", "--epochs", "1", "--device", "cpu", "--no-progress"]


def test_training_numbers_that_make_no_sense_are_refused(files, capsys):
    from training import run as run_cli

    out = ["--out", str(files / "run")]
    cases = [
        (["--lr", "nan"], "lr must be a finite number, got nan"),
        (["--lr", "inf"], "lr must be a finite number, got inf"),
        (["--momentum", "nan"], "momentum must be a finite number"),
        (["--momentum", "1.5"], "momentum must lie in [0, 1)"),
        (["--weight-decay", "nan"], "weight_decay must be a finite number"),
        (["--feedback-scale", "nan"], "feedback_scale must be a finite number"),
        (["--feedback-scale", "-1"], "feedback_scale must be positive"),
        (["--feedback-scale", "0"], "feedback_scale must be positive"),
        (["--seed", str(2**70)], "seed must lie in [0, 2**63)"),
        (["--seed", "-1"], "seed must lie in [0, 2**63)"),
        (["--batch-size", "1"], "batch norm needs more than one example"),
        (["--rule", "rdd", "--rdd-time", "nan"], "rdd_time must be a finite number"),
    ]
    for argv, needle in cases:
        assert needle in one_line_error(run_cli.main, [*TRAIN, *argv, *out], capsys, files)
    assert not (files / "run").exists()


def fake_run(out: Path, seed: int, config_seed: int) -> None:
    """A run directory whose checkpoint is of ``seed`` and whose config.json of ``config_seed``."""
    import json
    from dataclasses import asdict

    import torch

    from spikealign import trainer
    from spikealign.trainer import rundir

    out.mkdir()
    config = asdict(trainer.TrainConfig(dataset="digits", rule="fa", epochs=1, device="cpu"))
    checkpoint = {"format": rundir.CHECKPOINT_FORMAT, "config": config | {"seed": seed}}
    torch.save(checkpoint | {"epoch": 1}, out / trainer.CHECKPOINT_FILE)
    (out / trainer.CONFIG_FILE).write_text(json.dumps(config | {"seed": config_seed}))


def test_resume_into_another_runs_directory_is_refused(tmp_path, capsys):
    from training import run as run_cli

    mixed, other = tmp_path / "mixed", tmp_path / "other"
    fake_run(mixed, seed=2, config_seed=1)  # two runs wrote into one directory
    err = one_line_error(run_cli.main, ["--resume", "--epochs", "2", "--out", str(mixed)], capsys)
    assert "holds files of two runs (seed: 1 in config.json, 2 in checkpoint.pt)" in err
    fake_run(other, seed=2, config_seed=2)
    argv = ["--resume", "--seed", "7", "--epochs", "2", "--out", str(other)]
    err = one_line_error(run_cli.main, argv, capsys, tmp_path)
    assert "is of another run (seed: 2 in the checkpoint, 7 asked)" in err


def test_training_plot_errors_are_one_line(tmp_path, capsys):
    import json
    from dataclasses import asdict

    from spikealign import trainer
    from training import plot

    run = tmp_path / "run"
    run.mkdir()
    config = asdict(trainer.TrainConfig(dataset="digits", rule="fa"))
    (run / "config.json").write_text(json.dumps(config))
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_error": 0.5}) + "\n")
    (tmp_path / "file").write_text("")
    cases = [
        ([str(run), "--out", str(tmp_path / "file")], "--out"),
        ([str(run), "--out", str(tmp_path / "fig")], "line 1 lacks train_loss"),
        ([str(tmp_path / "nowhere")], "is not a training run directory"),
    ]
    for argv, needle in cases:
        assert needle in one_line_error(plot.main, argv, capsys, tmp_path)
    (run / "metrics.jsonl").write_text("[1, 2]\n")
    assert "cannot read the run" in one_line_error(plot.main, [str(run)], capsys, tmp_path)
    (run / "config.json").write_text(json.dumps(config | {"lr": "fast"}))
    err = one_line_error(plot.main, [str(run)], capsys, tmp_path)
    assert "config field lr = 'fast' is not of type float" in err


# -- the first build of the LIF program ---------------------------------------------------------


def _process_group(pgid: int) -> dict[int, str]:
    """pid -> command name of every process in a process group (from /proc)."""
    members = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members[int(entry.name)] = name
    return members


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_killed_build_leaves_no_compiler_running(tmp_path):
    from spikealign import lif

    cache = tmp_path / "cache"
    code = "import sys; from spikealign import lif; lif.LIFProgram([7, 5], 0.05, None, sys.argv[1])"
    parent = subprocess.Popen([sys.executable, "-c", code, str(cache)], cwd=REPO, env=ENV)
    try:
        deadline, worker, compiling = time.monotonic() + 180, None, False
        while time.monotonic() < deadline and not compiling:
            assert parent.poll() is None, "the build finished before it could be killed"
            worker = worker or next(iter(_children(parent.pid)), None)
            if worker is not None:
                names = set(_process_group(worker).values())
                compiling = bool(names & {"make", "g++", "cc1plus", "c++", "gcc", "as", "ld"})
            time.sleep(0.05)
        assert compiling, "the build never started the compiler"
    finally:
        parent.kill()  # SIGKILL: no Python code of the parent runs
        parent.wait()
    deadline = time.monotonic() + 10
    while _process_group(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _process_group(worker) == {}
    # The killed build's staging directory is deleted by the next build of any shape.
    (staging,) = list(cache.rglob(f"lif_7-5_*.{parent.pid}.*"))
    lif._remove_dead_staging(staging.parent / staging.name.split(".")[0])
    assert not staging.exists()
