"""Spiking phases run in a separate process, for the trainer's ``--rdd-overlap``.

Why a process: a phase in a thread beside the training loop shares the interpreter lock with it.
The simulation itself is a separate program, but reading its results, the estimation and the
spike log are Python and numpy with short lock-free stretches; on an H100 machine the 90 s phase
took 11.6 s in a thread during training against 4.4 s alone. A spawned process has its own
interpreter (spawn, not fork: the trainer has threads and may hold CUDA state, which a fork copies
broken).

:class:`PhaseProcess` keeps one worker process for the whole run, so its imports are paid once and
the phase object it builds (with its opened compiled program) is reused by every later phase of
the same shape. Each job carries what a phase needs, the phase's type, sizes, :class:`PhaseConfig`
(seed included), cache directory and estimator state (``state_dict``), the fc matrices and the
spike log path; it returns the new feedback, the new state and the wall time. The caller loads the
state back into its own phase object, so checkpoints and resume are the same as with the phase
run in the caller's process, and the feedback is the same for the same inputs and seed. The
worker writes the spike log itself (atomically, as every phase does).

The worker stops a running phase (cleanly: the compiled program's process is killed and the log
left as ``.partial``) on Ctrl-C, when the caller closes it with ``stop=True`` and when the caller's
process dies; otherwise it ignores SIGINT, so an idle worker prints nothing on Ctrl-C.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from pathlib import Path

from spikealign.errors import UserError

#: seconds between the worker's checks for a stop request or a dead parent
_WATCH_S = 0.2
#: seconds a worker whose parent died gives its interrupted phase to clean up before it exits
_ORPHAN_GRACE_S = 2.0


class PhaseProcess:
    """One worker process running one phase at a time: :meth:`start`, then :meth:`result`."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._executor = ProcessPoolExecutor(
            max_workers=1,
            mp_context=context,
            initializer=_init_worker,
            initargs=(os.getpid(), self._stop),
        )
        self._job: Future | None = None

    def start(self, phase, weights, feedbacks, log_path: str | Path | None) -> None:
        """Run ``phase`` (its type, sizes, config, cache dir and state) on these matrices."""
        if self._job is not None:
            raise RuntimeError("a phase is already running in the phase process")
        self._job = self._executor.submit(
            _run_phase,
            type(phase),
            phase.sizes,
            phase.config,
            phase.cache_dir,
            phase.state_dict(),
            weights,
            feedbacks,
            None if log_path is None else str(log_path),
        )

    def result(self, phase) -> tuple[list, float]:
        """Wait for the phase; load its new state into ``phase``; return (feedbacks, wall_s).

        An error of the phase (UserError included) is raised here as it was raised there.
        """
        job, self._job = self._job, None
        try:
            feedbacks, state, wall_s = job.result()
        except BrokenProcessPool as err:  # the worker itself died: nothing of this phase is left
            raise UserError(
                "the spiking-phase process ended unexpectedly (killed, or out of memory); the "
                "checkpoint of the last finished epoch is kept: continue with --resume"
            ) from err
        phase.load_state_dict(state)
        return feedbacks, wall_s

    def close(self, stop: bool = False) -> None:
        """End the worker; ``stop``: interrupt a running phase instead of waiting for it."""
        if stop:
            self._stop.set()
        self._job = None
        self._executor.shutdown(wait=True, cancel_futures=True)


# -- the worker process ---------------------------------------------------------------------------
#: the worker's phase, kept between jobs (with its compiled program); None before the first
_phase = None
#: whether the worker runs a phase now: SIGINT interrupts it then, and is ignored otherwise
_running = False
#: the caller's stop request (an Event shared with it)
_stop = None


def _init_worker(parent_pid: int, stop) -> None:
    global _stop
    _stop = stop
    signal.signal(signal.SIGINT, _on_interrupt)
    main = threading.main_thread().ident

    def watch() -> None:
        while not stop.wait(_WATCH_S):
            if os.getppid() != parent_pid:  # the trainer died (killed): stop, then leave
                signal.pthread_kill(main, signal.SIGINT)
                time.sleep(_ORPHAN_GRACE_S)
                os._exit(1)
        # A stop request: interrupt the running phase (aimed at the main thread, so that a
        # blocking wait there returns at once).
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=watch, name="phase-worker-watch", daemon=True).start()


def _on_interrupt(signum, frame) -> None:
    if _running:
        raise KeyboardInterrupt


def _run_phase(phase_type, sizes, config, cache_dir, state, weights, feedbacks, log_path):
    """Body of one job in the worker: (new feedbacks, new phase state, wall time in s)."""
    global _phase, _running
    reusable = (
        type(_phase) is phase_type
        and _phase.sizes == list(sizes)
        and _phase.cache_dir == cache_dir
        and replace(_phase.config, seed=config.seed) == config
    )
    if reusable:
        _phase.config = config
    else:
        _phase = phase_type(sizes, config=config, cache_dir=cache_dir, progress=False)
    _phase.load_state_dict(state)
    _running = True
    try:
        if _stop.is_set():  # stopped before this job began: the watcher's signal came too early
            raise KeyboardInterrupt
        start = time.perf_counter()
        result = _phase.run(weights=weights, feedbacks=feedbacks, log_path=log_path)
        wall_s = time.perf_counter() - start
    finally:
        _running = False
    return list(result.feedbacks), _phase.state_dict(), wall_s
