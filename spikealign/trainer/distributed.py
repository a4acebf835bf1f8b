"""Training on several processes launched by ``torchrun``: all the rank logic, in one place.

``torchrun --nproc_per_node N -m training.run ...`` starts N copies of the program and sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`setup` joins
the process group from them (``env://`` rendezvous, as torchvision's reference scripts do): NCCL
with one GPU per process (``cuda:LOCAL_RANK``) when CUDA is used, gloo on the CPU. A program
started without torchrun is a group of one, and every method here is then a no-op.

Conventions the trainers follow:

- The batch size in a config is the *global* batch: each of the ``world_size`` ranks takes
  ``batch_size / world_size`` examples per step (:meth:`Distributed.local_batch_size`), from its
  share of a :class:`~torch.utils.data.distributed.DistributedSampler` order.
- The model is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`, which averages the
  gradients, so every rank takes the same optimiser step and keeps identical parameters.
- Sums that make the epoch's metrics are all-reduced (:meth:`Distributed.all_reduce`), so every rank
  holds the global figures; only rank 0 (:attr:`Distributed.is_main`) writes files.
- A user mistake noticed on rank 0 alone (:meth:`Distributed.on_main`) is broadcast, so every rank
  stops with the same :class:`~spikealign.errors.UserError` instead of waiting forever; only rank 0
  prints it (:func:`spikealign.errors.exit_on_user_error`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as torch_dist

from spikealign.errors import UserError

T = TypeVar("T")

#: Choices of the ``--dist-backend`` option; ``auto`` is NCCL on CUDA and gloo on the CPU.
BACKENDS = ("auto", "nccl", "gloo")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the group: ``rank`` of ``world_size``, GPU ``local_rank``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_batch_size(self, batch_size: int) -> int:
        """This rank's share of the global ``batch_size`` (UserError if it does not divide)."""
        if batch_size % self.world_size:
            raise UserError(
                f"batch size {batch_size} does not split over {self.world_size} processes; "
                f"use a multiple of {self.world_size}"
            )
        return batch_size // self.world_size

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        if self.enabled:
            torch_dist.all_reduce(tensor)
        return tensor

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank, in place; returns it."""
        if self.enabled:
            torch_dist.broadcast(tensor, src=0)
        return tensor

    def sync_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (batch-norm statistics, feedback) in ``module`` on every rank.

        DDP does this at the start of every forward pass; after the last step of an epoch each
        rank's batch-norm statistics have seen only its own batch, so evaluation and checkpoints
        call this first.
        """
        if self.enabled:
            for buffer in module.buffers():
                torch_dist.broadcast(buffer, src=0)

    def broadcast_object(self, value: T) -> T:
        """Rank 0's picklable ``value`` on every rank (plain values of this program only)."""
        if not self.enabled:
            return value
        box = [value]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, value: T) -> list[T]:
        """Every rank's picklable ``value``, in rank order, on every rank."""
        if not self.enabled:
            return [value]
        gathered = [None] * self.world_size
        torch_dist.all_gather_object(gathered, value)
        return gathered

    def on_main(self, action: Callable[[], T]) -> T | None:
        """Run ``action`` on rank 0 only; a UserError it raises is raised on every rank."""
        message = None
        result = None
        if self.is_main:
            try:
                result = action()
            except UserError as err:
                message = str(err)
        message = self.broadcast_object(message)
        if message is not None:
            raise UserError(message)
        return result


_current = Distributed()


def current() -> Distributed:
    """The group this process belongs to (a group of one until :func:`setup` joined one)."""
    return _current


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without CUDA is a UserError."""
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"unknown device {name!r}; choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda requested but CUDA is not available; use --device cpu or auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def setup(device_name: str = "auto", backend: str = "auto") -> torch.device:
    """Join torchrun's process group if there is one; returns this process's device.

    Idempotent: a second call in the same process returns the same device.
    """
    global _current
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not launched_by_torchrun():
        return resolve_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise UserError(
            "the nccl backend needs CUDA, and this run is on the CPU; "
            "use --dist-backend gloo (or auto) or run on GPUs"
        )
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s); "
                "start torchrun with --nproc_per_node at most the number of GPUs"
            )
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend=backend, init_method="env://")
    _current = Distributed(torch_dist.get_rank(), torch_dist.get_world_size(), local_rank)
    return device


def run_and_leave(action: Callable[[], T]) -> bool:
    """Run ``action`` (a whole run), then leave the process group, also on an error; returns
    whether this process is rank 0 (the one that reports)."""
    try:
        action()
        return current().is_main
    finally:
        shutdown()


def shutdown() -> None:
    """Leave the process group (end of a torchrun program)."""
    global _current
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
    _current = Distributed()
