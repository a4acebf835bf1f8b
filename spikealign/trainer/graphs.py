"""A training pass as replays of one CUDA graph of the whole step (``cuda_graph``).

For a network as small as the paper's at batch 32 the GPU runs a step's kernels faster than Python
can launch them: the step costs its launch overhead, not its math. A CUDA graph records the
kernels of one step once and replays them with one call per batch. The recorded step is all of it:

    batch   = the plan's examples [position, position + B), cropped, flipped and normalised
    loss    = the forward pass; backward through the rule's feedback; SGD step; rule updates
    sums   += (B * loss, errors, top-k errors);  position += B

with ``position`` and ``sums`` tensors on the device, so no value crosses to the host until the
pass ends. A replay touches the same memory as the capture, so everything the step uses keeps its
address: parameters, buffers (feedback, batch-norm statistics), momentum buffers and the pass plan
are all updated in place, and the spiking phase copies its feedback into the layers' buffers.

Numbers baked into the graph at capture (the learning rate, which changes per epoch) and the pass
plan (new random draws per pass) are why a graph serves one pass: each pass runs
:data:`WARMUP_STEPS` ordinary steps on a side stream first (the lazy allocations of the first
steps - momentum buffers, cuDNN autotuning, cuBLAS workspaces - must not happen inside a capture,
as PyTorch's CUDA-graph notes prescribe), then captures the next step and replays it for the
rest. The warm-up steps are the pass's first batches, so a graphed pass trains on exactly the
batches of an eager one.

Needs (checked by the trainer, one-line errors otherwise): CUDA, the data on the device, one
process, no torch.compile mode that makes CUDA graphs itself, a rule whose backward has no
host-side work (not dfa).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from spikealign.device_data import DeviceLoader, PassPlan
from spikealign.trainer.scores import ScoreKeeper, batch_sums

#: Eager steps at the start of each pass before the capture.
WARMUP_STEPS = 3


class GraphedPass:
    """Training passes over ``loader`` whose steps are ``step(inputs, targets) -> (loss, logits)``.

    ``capture=False`` runs the very same step body eagerly (position and sums on the device); the
    CPU tests use it to check the body against the ordinary loop, which CUDA graphs then replay.
    """

    def __init__(
        self,
        loader: DeviceLoader,
        step: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
        top_k: int | None = None,
        capture: bool = True,
    ):
        if loader.drop_last is False:
            raise ValueError("a graphed pass replays full batches only (drop_last=True)")
        self.loader, self.step, self.top_k, self.capture = loader, step, top_k, capture
        device = loader.dataset.device
        self.position = torch.zeros((), dtype=torch.int64, device=device)
        # B * loss, errors, top-k errors, summed over the pass
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.plan: PassPlan | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    def _body(self) -> None:
        inputs, targets = self.loader.batch_at(self.plan, self.position)
        self.position.add_(self.loader.batch_size)
        loss, logits = self.step(inputs, targets)
        loss_sum, errors, top_k_errors = batch_sums(loss, logits, targets, self.top_k)
        self.sums[0] += loss_sum
        self.sums[1] += errors
        if top_k_errors is not None:
            self.sums[2] += top_k_errors

    def run(self, keeper: ScoreKeeper, advance: Callable[[int], object] = lambda n: None) -> None:
        """One pass: its scores go to ``keeper``; ``advance(n)`` after every n batches done."""
        self.graph = None  # the previous pass's graph and its memory pool
        self.plan = self.loader.plan()
        self.position.zero_()
        self.sums.zero_()
        batches = len(self.loader)
        eager = min(WARMUP_STEPS, batches) if self.capture else batches
        if self.capture:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._eager_steps(eager, advance)
            torch.cuda.current_stream().wait_stream(side)
        else:
            self._eager_steps(eager, advance)
        if eager < batches:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records the step; runs nothing
                self._body()
            for _ in range(batches - eager):
                self.graph.replay()
                advance(1)
        count = batches * self.loader.batch_size
        top_k = self.sums[2].clone() if self.top_k is not None else None
        keeper.add_sums(count, self.sums[0].clone(), self.sums[1].clone(), top_k)

    def _eager_steps(self, count: int, advance) -> None:
        for _ in range(count):
            self._body()
            advance(1)
