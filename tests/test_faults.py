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
        np.testing.assert_array_equal(log.alignment()["time"], np.arange(0, until + 1))
        for fc, matrices in expected["weights"].items():
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
