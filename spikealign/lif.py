"""The leaky integrate-and-fire network of the feedback-training phase (Brian2).

Every layer of the fully connected chain (for example 1600-384-192-10) is a group of LIF neurons.
With ``dt = 1 ms`` and the reference values of :class:`LIFParams`:

Synaptic kernel (a difference of two exponentials, ``n`` steps after a spike)::

    kappa(n) = (exp(-n dt / tau_L) - exp(-n dt / tau_s)) / ((tau_L - tau_s) / dt)

run exactly as two decaying traces per neuron: a spike arriving through weight ``w`` adds ``w`` to
both ``trace_L`` and ``trace_s``, and ``drive = (trace_L - trace_s) / kernel_norm`` with
``kernel_norm = (tau_L - tau_s) / dt``.

Drive ``B`` of a neuron (called ``drive`` below): in a noise-driven layer
``B = alpha * (kappa * noise spikes)`` and nothing else (its synaptic input is dropped);
elsewhere ``B = sum_j W_hat_ij (kappa * spikes_j)`` of the layer below with
``W_hat = drive_gain * n_in * W / std(W)`` (``drive_gain`` is 0.2 in METHOD 2; it is set per
phase, :class:`spikealign.phase.PhaseConfig`, and is no part of the program). Biases, batch norm
and ReLU are not part of the spiking network; layers below the driven one receive nothing and stay
silent. Several layers can be driven at once: two that are not adjacent (say 0 and 2) each see
exactly what they would see alone, because a driven layer ignores the spikes of the layer below
it, and the layer between them listens only to the lower one.

Membrane and input drive::

    dv/dt = -g_L v + g_D (B - v)        spike when v >= theta and not refractory; then v = v_reset
    du/dt = -g_L u + g_D (B - u)        never reset by spikes; outside an RDD window u = v

so a constant drive gives the steady state ``v = g_D / (g_L + g_D) * B = 6/7 B``. The refractory
period blocks spikes only; ``v`` keeps integrating. The equations are integrated exactly (they are
linear), so a constant drive follows ``v(t) = 6/7 B (1 - exp(-(g_L + g_D) t))``.

Noise: at any moment a random ``noise_fraction`` (20 %) of the driven layer receives Poisson spikes
at ``noise_rate`` (200 Hz); the subset is redrawn every ``noise_period`` (100 ms; a parameter
of the program, so another value builds and caches its own, ``--noise-period``). The random
numbers come from a counter-based generator (a hash of seed, layer, neuron and time step), so a
phase is reproducible from its seed and independent of how it is cut into segments.

RDD windows (METHOD 4), kept per neuron of the driven layer: a window opens when
``|theta - u| <= window_open_band`` and none is open; while open, ``u_max`` tracks the maximum of
``u`` and the neuron's spikes are counted; it closes ``window_length`` (30 ms) later and is recorded
(neuron, start, end, u_max, spikes). The outcome of each window is computed afterwards from the
recorded spikes of the layer above (:mod:`spikealign.rdd`).

The program is built once per network shape with Brian2's ``cpp_standalone`` device and cached on
disk with a manifest of its inputs and outputs; each segment of a phase runs the compiled binary
directly with new weights, state and seed in Brian2's ``run_args`` format (no code generation or
recompilation, also in later processes), in the background if the caller wants
(:meth:`LIFProgram.start_segment`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from spikealign.rdd import Windows

#: Bump when the generated program changes, so old cached builds are not reused.
PROGRAM_VERSION = 5


@dataclass(frozen=True)
class LIFParams:
    """Parameters of the LIF network (reference values, METHOD 2 and 4). Units in the comments."""

    dt: float = 1e-3  # s, time step
    threshold: float = 1.0  # theta, spike threshold (dimensionless potential)
    v_reset: float = -1.0  # potential after a spike
    refractory: float = 3e-3  # s, t_ref: no spike (v keeps integrating)
    tau_L: float = 10e-3  # s, slow kernel time constant
    tau_s: float = 3e-3  # s, fast kernel time constant
    g_L: float = 100.0  # 1/s, leak conductance
    g_D: float = 600.0  # 1/s, dendritic conductance
    alpha: float = 4.0  # weight of the driving noise
    noise_rate: float = 200.0  # Hz, Poisson rate of the driving noise
    noise_fraction: float = 0.2  # share of the driven layer that receives noise at a time
    noise_period: float = 0.1  # s, the noise-driven subset is redrawn this often
    window_length: float = 30e-3  # s, length of an RDD window
    window_open_band: float = 0.1  # a window opens when |theta - u| <= this

    @property
    def kernel_norm(self) -> float:
        """(tau_L - tau_s) / dt: the kernel's normalisation."""
        return (self.tau_L - self.tau_s) / self.dt

    def kernel(self, n_steps: int) -> np.ndarray:
        """kappa(n) for n = 1..n_steps (the discrete kernel of METHOD 2)."""
        n = np.arange(1, n_steps + 1)
        return (np.exp(-n * self.dt / self.tau_L) - np.exp(-n * self.dt / self.tau_s)) / (
            self.kernel_norm
        )


#: The neuron model, one Brian2 equation string with units (see the module docstring).
NEURON_EQUATIONS = """
dv/dt = -g_L*v + g_D*(drive - v) : 1
du/dt = -g_L*u + g_D*(drive - u) : 1
drive = (trace_L - trace_s) / kernel_norm : 1
dtrace_L/dt = -trace_L/tau_L : 1
dtrace_s/dt = -trace_s/tau_s : 1
incoming : 1
in_window : boolean
window_start : second
u_max : 1
window_spikes : integer
driven : boolean (shared)
t_offset : second (shared)
seed : integer (shared)
layer_id : integer (shared, constant)
"""

#: Spike: reset the potential (u is left alone) and count the spike if a window is open.
SPIKE_RESET = "v = v_reset\nwindow_spikes += int(in_window)"

#: Input of this step enters both kernel traces at once: synaptic spikes, or in a driven layer noise
#: spikes alone (METHOD 2); synapses write one variable so each synaptic event costs one addition.
NOISE_CODE = """
step = int((t + t_offset) / dt + 0.5)
subset = int((t + t_offset) / noise_period + 0.5*dt/noise_period)
noise = int(driven and hash_uniform(seed, layer_id * 2 + 0, i, subset) < noise_fraction \
and hash_uniform(seed, layer_id * 2 + 1, i, step) < noise_rate * dt)
incoming = incoming * int(not driven) + alpha * noise
trace_L += incoming
trace_s += incoming
incoming = 0
"""

#: RDD window bookkeeping, run after spikes and resets, in this order.
WINDOW_TRACK = "u_max = clip(u, u_max, inf)"
WINDOW_CLOSE_CONDITION = "in_window and t + t_offset >= window_start + window_length - 0.5*dt"
WINDOW_CLOSE = "in_window = False"
WINDOW_FOLLOW = "u = v * (1 - int(in_window)) + u * int(in_window)"
WINDOW_OPEN_CONDITION = "driven and not in_window and abs(threshold - u) <= window_open_band"
WINDOW_OPEN = "in_window = True\nwindow_start = t + t_offset\nu_max = u\nwindow_spikes = 0"

#: Set per segment besides the state: whether the layer is noise-driven, where the segment starts
#: in the phase (the program's clock restarts at 0 each time) and the seed of the noise.
_SEGMENT_INPUTS = ("driven", "t_offset", "seed")

#: Recorded at the close of every RDD window, besides its end time and neuron.
_WINDOW_VARIABLES = ("window_start", "u_max", "window_spikes")

#: State carried from one segment of a phase to the next.
STATE_VARIABLES = (
    "v",
    "u",
    "trace_L",
    "trace_s",
    "in_window",
    "window_start",
    "u_max",
    "window_spikes",
    "lastspike",
    "not_refractory",
)

_HASH_CPP = """
static inline double hash_uniform(int64_t seed, int64_t stream, int64_t neuron, int64_t counter)
{
    // splitmix64 over the key (seed, stream, neuron, counter): a counter-based generator
    uint64_t z = (uint64_t)seed * 0x9E3779B97F4A7C15ULL;
    z ^= (uint64_t)stream * 0xD1B54A32D192ED03ULL;
    z ^= (uint64_t)neuron * 0xAEF17502108EF2D9ULL;
    z ^= (uint64_t)counter * 0xF1357AEA2E62A9C5ULL;
    z += 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z = z ^ (z >> 31);
    return (z >> 11) * (1.0 / 9007199254740992.0);
}
"""


def hash_uniform(seed, stream, neuron, counter) -> np.ndarray:
    """NumPy twin of the C++ generator (same numbers), for the runtime device and for tests."""
    with np.errstate(over="ignore"):
        u64 = np.uint64
        z = np.asarray(seed).astype(np.int64).astype(u64) * u64(0x9E3779B97F4A7C15)
        z ^= np.asarray(stream).astype(np.int64).astype(u64) * u64(0xD1B54A32D192ED03)
        z ^= np.asarray(neuron).astype(np.int64).astype(u64) * u64(0xAEF17502108EF2D9)
        z ^= np.asarray(counter).astype(np.int64).astype(u64) * u64(0xF1357AEA2E62A9C5)
        z += u64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> u64(30))) * u64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> u64(27))) * u64(0x94D049BB133111EB)
        z = z ^ (z >> u64(31))
        return (z >> u64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def scaled_weights(weight: np.ndarray, drive_gain: float) -> np.ndarray:
    """W_hat = drive_gain * n_in * W / std(W): the synaptic weights of the spiking network."""
    weight = np.asarray(weight, dtype=np.float64)
    std = weight.std()
    if std == 0:
        return np.zeros_like(weight)
    return drive_gain * weight.shape[1] * weight / std


@dataclass
class SegmentRecord:
    """What one segment of simulation recorded. Times are absolute (seconds since phase start)."""

    spike_times: list[np.ndarray]  # per layer
    spike_indices: list[np.ndarray]  # per layer
    windows: dict[int, Windows]  # RDD windows of each driven layer


def default_cache_dir() -> Path:
    """Where compiled programs are kept: $SPIKEALIGN_CACHE or ~/.cache/spikealign."""
    root = os.environ.get("SPIKEALIGN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "spikealign"
    )
    return Path(root) / "brian2"


#: Written last into a build directory: names the binary's inputs and outputs.
MANIFEST = "spikealign_manifest.json"


class LIFProgram:
    """The compiled Brian2 program for one network shape and segment length.

    The first use builds it (Brian2 code generation and compilation, about half a minute) into a
    directory under ``cache_dir`` keyed by the shape, the parameters and the segment length, and
    writes a manifest of the binary's inputs and outputs there. Every segment then runs the binary
    directly with new weights, state and seed, passed the way Brian2's ``run_args`` pass them
    (``group.variable=value_or_file``), and reads its results from a scratch directory. Later
    phases and later processes reuse the build without generating code again; several programs
    can be used side by side, and several processes can share one build.
    """

    def __init__(
        self,
        sizes: list[int],
        segment_duration: float,
        params: LIFParams | None = None,
        cache_dir: str | Path | None = None,
        threads: int | None = None,
    ) -> None:
        self.sizes = [int(n) for n in sizes]
        self.threads = _threads(threads)
        self.params = params or LIFParams()
        steps = round(segment_duration / self.params.dt)
        if steps < 1:
            raise ValueError("segment_duration must be at least one time step")
        self.segment_steps = steps
        self.segment_duration = steps * self.params.dt
        key = json.dumps(
            {
                "sizes": self.sizes,
                "steps": steps,
                "params": asdict(self.params),
                "version": PROGRAM_VERSION,
                "threads": self.threads,
            },
            sort_keys=True,
        )
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        shape = "-".join(map(str, self.sizes))
        cache = Path(cache_dir or default_cache_dir()).absolute()  # the binary runs in its dir
        self.directory = cache / f"lif_{shape}_{digest}"
        start = time.perf_counter()
        if not (self.directory / MANIFEST).is_file():
            self._build()
        self._manifest = json.loads((self.directory / MANIFEST).read_text())
        self.build_s = time.perf_counter() - start
        self._synapse_order = [self._dense_order(index) for index in range(len(self.sizes) - 1)]
        # per synapse group: (the weights, their file), written when they change (_weights_input)
        self._weight_files: dict[int, tuple[np.ndarray, str]] = {}
        self._weight_directory: tempfile.TemporaryDirectory | None = None

    # -- construction -------------------------------------------------------------------------
    def _build(self) -> None:
        """Generate and compile the program in a staging directory, then move it into place.

        The build runs in a worker process that leads its own process group, so the compiler
        processes it starts (make, g++) can be killed with it: on an exception here (Ctrl-C
        included), and by the worker itself when this process dies (it watches its parent).
        """
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_staging(self.directory)
        staging = Path(
            tempfile.mkdtemp(
                prefix=f"{self.directory.name}.{os.getpid()}.", dir=self.directory.parent
            )
        )
        try:
            _run_build_worker(self, staging)
            if self.directory.exists():  # an unfinished or outdated build without manifest
                if (self.directory / MANIFEST).is_file():
                    return  # another process finished the same build first
                shutil.rmtree(self.directory, ignore_errors=True)
            staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
            os.rename(staging, self.directory)
        except OSError:
            if not (self.directory / MANIFEST).is_file():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _generate(self, directory: Path) -> dict:
        """Build the Brian2 network, compile it into ``directory`` and describe its files."""
        import brian2 as b2
        from brian2.devices import device_module

        p = self.params
        hash_fn = b2.Function(
            hash_uniform,
            arg_units=[1, 1, 1, 1],
            return_unit=1,
            arg_types=["integer", "integer", "integer", "integer"],
            return_type="float",
            stateless=True,
        )
        hash_fn.implementations.add_implementation("cpp", code=_HASH_CPP, name="hash_uniform")

        device_module.reset_device("runtime")  # forget any earlier standalone project
        b2.set_device("cpp_standalone", directory=None, build_on_run=False)
        b2.device.reinit()
        b2.device.activate(build_on_run=False)
        b2.prefs.devices.cpp_standalone.openmp_threads = self.threads
        # Linking with -ffast-math flushes subnormal numbers to zero: the decaying traces of a
        # silent layer would otherwise stay subnormal and make the program 3 to 5 times slower.
        b2.prefs.codegen.cpp.extra_link_args = ["-ffast-math"]
        b2.prefs.logging.console_log_level = "WARNING"
        b2.defaultclock.dt = p.dt * b2.second

        namespace = {
            "g_L": p.g_L * b2.Hz,
            "g_D": p.g_D * b2.Hz,
            "tau_L": p.tau_L * b2.second,
            "tau_s": p.tau_s * b2.second,
            "kernel_norm": p.kernel_norm,
            "threshold": p.threshold,
            "v_reset": p.v_reset,
            "alpha": p.alpha,
            "noise_rate": p.noise_rate * b2.Hz,
            "noise_fraction": p.noise_fraction,
            "noise_period": p.noise_period * b2.second,
            "window_length": p.window_length * b2.second,
            "window_open_band": p.window_open_band,
            "hash_uniform": hash_fn,
            "inf": np.inf,
        }
        groups, spike_monitors, window_monitors, synapses = [], [], [], []
        for index, size in enumerate(self.sizes):
            group = b2.NeuronGroup(
                size,
                NEURON_EQUATIONS,
                threshold="v >= threshold",
                reset=SPIKE_RESET,
                refractory=p.refractory * b2.second,
                method="exact",
                events={
                    "window_close": WINDOW_CLOSE_CONDITION,
                    "window_open": WINDOW_OPEN_CONDITION,
                },
                namespace=namespace,
                name=f"layer{index}",
            )
            group.layer_id = index
            group.v = 0
            group.u = 0
            group.run_regularly(NOISE_CODE, when="synapses", order=10, name=f"noise{index}")
            # window bookkeeping after resets, in order: track u_max, close, follow v, open
            group.run_regularly(WINDOW_TRACK, when="after_resets", order=0, name=f"track{index}")
            group.set_event_schedule("window_close", when="after_resets", order=1)
            window_monitors.append(
                b2.EventMonitor(
                    group,
                    "window_close",
                    variables=["window_start", "u_max", "window_spikes"],
                    when="after_resets",
                    order=2,
                    name=f"windows{index}",
                )
            )
            group.run_on_event("window_close", WINDOW_CLOSE, when="after_resets", order=3)
            group.run_regularly(WINDOW_FOLLOW, when="after_resets", order=4, name=f"follow{index}")
            group.set_event_schedule("window_open", when="after_resets", order=5)
            group.run_on_event("window_open", WINDOW_OPEN, when="after_resets", order=6)
            groups.append(group)
            spike_monitors.append(b2.SpikeMonitor(group, name=f"spikes{index}"))
        for index in range(1, len(self.sizes)):
            syn = b2.Synapses(
                groups[index - 1],
                groups[index],
                "w : 1",
                on_pre="incoming_post += w",
                name=f"fc{index}",
            )
            syn.connect()  # dense: every pre neuron to every post neuron
            synapses.append(syn)
        network = b2.Network(groups, synapses, spike_monitors, window_monitors)
        network.run(self.segment_duration * b2.second, namespace={})
        with _quiet():
            b2.device.build(directory=str(directory), compile=True, run=False, with_output=False)

        def describe(obj, name):
            variable = obj.variables[name]
            return {
                "key": f"{obj.name}.{name}",
                "file": b2.device.get_array_filename(variable),
                "dtype": np.dtype(variable.dtype).str,
            }

        manifest = {
            "binary": "main.exe" if os.name == "nt" else "main",
            "layers": [
                {name: describe(group, name) for name in (*STATE_VARIABLES, *_SEGMENT_INPUTS)}
                for group in groups
            ],
            "synapses": [describe(syn, "w") for syn in synapses],
            "spikes": [{name: describe(m, name) for name in ("t", "i")} for m in spike_monitors],
            "windows": [
                {name: describe(m, name) for name in ("t", "i", *_WINDOW_VARIABLES)}
                for m in window_monitors
            ],
        }
        device_module.reset_device("runtime")
        return manifest

    def _dense_order(self, index: int):
        """Synapses are created pre-major by connect(); the (post, pre) index of each synapse."""
        n_pre, n_post = self.sizes[index], self.sizes[index + 1]
        pre = np.repeat(np.arange(n_pre), n_post)
        post = np.tile(np.arange(n_post), n_pre)
        return pre, post

    # -- running ------------------------------------------------------------------------------
    def initial_state(self) -> list[dict[str, np.ndarray]]:
        """All neurons at rest (v = u = 0), no window open, not refractory."""
        return [
            {
                "v": np.zeros(n),
                "u": np.zeros(n),
                "trace_L": np.zeros(n),
                "trace_s": np.zeros(n),
                "in_window": np.zeros(n, dtype=bool),
                "window_start": np.zeros(n),
                "u_max": np.zeros(n),
                "window_spikes": np.zeros(n, dtype=np.int32),
                "lastspike": np.full(n, -1e4),
                "not_refractory": np.ones(n, dtype=bool),
            }
            for n in self.sizes
        ]

    def run_segment(
        self,
        weights: list[np.ndarray],
        state: list[dict[str, np.ndarray]],
        driven_layers: tuple[int, ...],
        seed: int,
        t_offset: float,
    ) -> tuple[SegmentRecord, list[dict[str, np.ndarray]]]:
        """Run one segment from ``state`` and return what it recorded and the final state.

        ``weights`` are the spiking network's synaptic weights (already scaled, out x in, one per
        fc layer); ``driven_layers`` the noise-driven layers (indices into the sizes);
        ``t_offset`` is the segment's start in seconds since the phase began. Values are in SI
        units (seconds).
        """
        return self.start_segment(weights, state, driven_layers, seed, t_offset).result()

    def start_segment(
        self,
        weights: list[np.ndarray],
        state: list[dict[str, np.ndarray]],
        driven_layers: tuple[int, ...],
        seed: int,
        t_offset: float,
    ) -> RunningSegment:
        """:meth:`run_segment` in the background: the caller can estimate from the previous
        segment while this one is simulated, then collect it with ``.result()``."""
        manifest = self._manifest
        driven_layers = tuple(sorted(int(layer) for layer in driven_layers))
        if not driven_layers or not all(0 <= l < len(self.sizes) for l in driven_layers):
            raise ValueError(f"driven layers must be layers 0..{len(self.sizes) - 1}")
        values = []
        for index, (entries, layer_state) in enumerate(zip(manifest["layers"], state, strict=True)):
            for name in STATE_VARIABLES:
                value = layer_state[name]
                if name == "lastspike":  # the program's clock restarts at 0 every segment
                    value = np.asarray(value) - t_offset
                values.append((entries[name], value))
            values.append((entries["driven"], index in driven_layers))
            values.append((entries["t_offset"], t_offset))
            values.append((entries["seed"], int(seed)))

        scratch = tempfile.TemporaryDirectory(prefix="spikealign-segment-")
        try:
            results = os.path.join(scratch.name, "results", "")
            os.mkdir(results)
            args = [str(self.directory / manifest["binary"]), "--results_dir", results]
            for number, (entry, weight) in enumerate(
                zip(manifest["synapses"], weights, strict=True)
            ):
                path = self._weights_input(number, entry, weight, scratch.name)
                args.append(f"{entry['key']}={path}")
            for number, (entry, value) in enumerate(values):
                array = np.asarray(value, dtype=entry["dtype"])
                if array.size == 1:  # a single value goes on the command line
                    args.append(f"{entry['key']}={array.item()!r}")
                else:
                    path = os.path.join(scratch.name, f"state{number}.dat")
                    np.ascontiguousarray(array).ravel().tofile(path)
                    args.append(f"{entry['key']}={path}")
            process = subprocess.Popen(
                args, cwd=self.directory, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        except BaseException:
            scratch.cleanup()
            raise
        return RunningSegment(self, process, scratch, results, driven_layers, t_offset)

    def _weights_input(self, number: int, entry: dict, weight: np.ndarray, directory: str) -> str:
        """A file in ``directory`` holding synapse group ``number``'s weights (out x in) in the
        program's synapse order: a hard link to one written once per weight matrix, as a phase
        runs every segment with the same weights (gathering and writing fc1's 1600 x 384 took 20
        ms a segment). A segment keeps its own link, so replacing the file never pulls it from
        under a running program."""
        held = self._weight_files.get(number)
        if held is None or not np.array_equal(held[0], weight):
            if self._weight_directory is None:
                self._weight_directory = tempfile.TemporaryDirectory(prefix="spikealign-weights-")
            pre, post = self._synapse_order[number]
            path = os.path.join(self._weight_directory.name, f"{number}.{time.monotonic_ns()}")
            np.asarray(weight[post, pre], dtype=entry["dtype"]).tofile(path)
            if held is not None:
                os.remove(held[1])
            held = self._weight_files[number] = (np.array(weight), path)
        link = os.path.join(directory, f"weights{number}.dat")
        try:
            os.link(held[1], link)
        except OSError:  # a file system without hard links
            shutil.copyfile(held[1], link)
        return link


class RunningSegment:
    """A segment being simulated by the compiled program in a separate process."""

    def __init__(self, program: LIFProgram, process, scratch, results, driven_layers, t_offset):
        self._program, self._process, self._scratch = program, process, scratch
        self._results, self._driven_layers, self._t_offset = results, driven_layers, t_offset

    def result(self) -> tuple[SegmentRecord, list[dict[str, np.ndarray]]]:
        """Wait for the segment; (what it recorded, the final state)."""
        try:
            _, stderr = self._process.communicate()
            if self._process.returncode != 0:
                message = stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
                raise RuntimeError(
                    f"the compiled LIF program in {self._program.directory} failed (exit "
                    f"{self._process.returncode}) {message[0]}; delete that directory to rebuild it"
                )
            return self._read()
        finally:
            self._scratch.cleanup()

    def cancel(self) -> None:
        """Stop the segment and delete its files."""
        if self._process.poll() is None:
            self._process.kill()
        self._process.communicate()  # reaps it and closes its stderr pipe
        self._scratch.cleanup()

    def _read(self) -> tuple[SegmentRecord, list[dict[str, np.ndarray]]]:
        manifest, t_offset = self._program._manifest, self._t_offset

        def read(entry):
            return np.fromfile(os.path.join(self._results, entry["file"]), dtype=entry["dtype"])

        spikes = manifest["spikes"]
        windows = {}
        for layer in self._driven_layers:
            columns = {name: read(entry) for name, entry in manifest["windows"][layer].items()}
            windows[layer] = Windows(
                neuron=columns["i"].astype(np.int32),
                start=columns["window_start"].astype(np.float64),
                end=columns["t"] + t_offset,
                u_max=columns["u_max"].astype(np.float64),
                spikes=columns["window_spikes"].astype(np.int32),
            )
        record = SegmentRecord(
            spike_times=[read(entries["t"]) + t_offset for entries in spikes],
            spike_indices=[read(entries["i"]).astype(np.int32) for entries in spikes],
            windows=windows,
        )
        new_state = []
        for entries in manifest["layers"]:
            layer_state = {name: read(entries[name]) for name in STATE_VARIABLES}
            layer_state["lastspike"] = layer_state["lastspike"] + t_offset
            new_state.append(layer_state)
        return record, new_state


def _remove_dead_staging(directory: Path) -> None:
    """Delete staging directories ``<name>.<pid>.*`` of builds whose process is gone."""
    from spikealign.outputs import process_alive

    for staging in directory.parent.glob(f"{directory.name}.*.*"):
        pid = staging.name[len(directory.name) + 1 :].split(".")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def _run_build_worker(program: LIFProgram, staging: Path) -> None:
    """Build ``program`` into ``staging`` (writing its manifest) in a worker process group."""
    request = {
        "sizes": program.sizes,
        "segment_duration": program.segment_duration,
        "params": asdict(program.params),
        "threads": program.threads,
        "directory": str(staging),
        "parent": os.getpid(),
    }
    package_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    code = "import sys, json; from spikealign.lif import _build_worker; _build_worker(sys.argv[1])"
    worker = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(request)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,  # its own process group: make and g++ go with it
    )
    try:
        _, stderr = worker.communicate()
    except BaseException:
        _kill_group(worker.pid)
        worker.wait()
        raise
    if worker.returncode != 0:
        lines = stderr.decode(errors="replace").strip().splitlines() or [""]
        raise RuntimeError(
            f"building the LIF program failed (exit {worker.returncode}): {lines[-1]}"
        )


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _build_worker(request_json: str) -> None:
    """Body of the build worker process: build, write the manifest, die with the parent."""
    request = json.loads(request_json)
    parent = request["parent"]

    def watch_parent():
        while os.getppid() == parent:
            time.sleep(0.2)
        _kill_group(os.getpgid(0))  # the parent died: stop make and the compilers too

    threading.Thread(target=watch_parent, daemon=True).start()
    program = LIFProgram.__new__(LIFProgram)
    program.sizes = request["sizes"]
    program.segment_duration = request["segment_duration"]
    program.params = LIFParams(**request["params"])
    program.threads = request["threads"]
    directory = Path(request["directory"])
    manifest = program._generate(directory)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _threads(threads: int | None) -> int:
    """OpenMP threads of the compiled program (part of the build); 0 means no OpenMP.

    The default is one thread (``$SPIKEALIGN_THREADS`` overrides it): every time step ends in a
    barrier, and on a machine whose cores are shared an OpenMP team spends more time waiting for
    its threads than it saves (benchmarks/rdd_phase.py measures both).
    """
    if threads is None:
        threads = int(os.environ.get("SPIKEALIGN_THREADS", "0"))
    return int(threads)


@contextlib.contextmanager
def _quiet():
    """Silence the compiler and binary output of Brian2's standalone device."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield


def clear_cache(cache_dir: str | Path | None = None) -> None:
    """Delete every cached build."""
    shutil.rmtree(cache_dir or default_cache_dir(), ignore_errors=True)
