"""The epoch loop every training run shares: run directory, checkpoints, exact resume, metrics.

A kind of run (classification in :mod:`spikealign.trainer.classify`, detection in
:mod:`spikealign.trainer.detect`) subclasses :class:`EpochLoop` and says

- how to run one epoch and what it measured (:meth:`EpochLoop.run_epoch`, one metrics row),
- what its checkpoint holds beyond the loop's own state (:meth:`EpochLoop.state_dict`, model and
  optimiser at least, and :meth:`EpochLoop.load_state_dict`),
- which data it was started on (:meth:`EpochLoop.data_signature`; resuming on other data is
  refused),
- what to draw at the end (:meth:`EpochLoop.finish`).

The loop does the rest, once for every kind of run: it seeds every generator from
:func:`~spikealign.trainer.config.epoch_seed` ``(seed, epoch)`` at the start of each epoch (so a run
resumed from its checkpoint ends with exactly the numbers of an uninterrupted one), saves the
checkpoint and rewrites the metrics files after each epoch, shows progress bars, and under
``torchrun`` lets only rank 0 write (:mod:`spikealign.trainer.distributed`).

:func:`run` is the whole life of a run: validate the config, refuse to clobber another run, resume
from the checkpoint, write ``config.json``, train the remaining epochs.
"""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from spikealign.errors import UserError
from spikealign.trainer import distributed
from spikealign.trainer.config import check_same_experiment, epoch_seed
from spikealign.trainer.rundir import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    check_config_file,
    load_checkpoint,
    lock_run_dir,
    prepare_out_dir,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_config,
    write_metrics,
)


def seed_everything(seed: int) -> None:
    """Seed torch (every device), numpy's and Python's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class EpochLoop:
    """One run in ``out_dir``: the epoch loop around a subclass's :meth:`run_epoch`."""

    def __init__(self, config, out_dir: str | Path, progress: bool = True):
        self.config = config
        self.out_dir = Path(out_dir)
        self.dist = distributed.current()
        # Progress bars on rank 0 only: eight ranks would draw eight bars.
        self.progress = progress and self.dist.is_main
        #: Order and augmentation of the training data; reseeded every epoch.
        self.generator = torch.Generator()
        self.history: list[dict] = []

    # -- what a kind of run provides
    def run_epoch(self, epoch: int) -> dict:
        """Train and test one epoch; return its metrics row (the same keys every epoch)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The run's own checkpoint entries: ``model`` and ``optimizer`` (the subclass's
        ``self.model`` and ``self.optimizer``); a subclass adds its own to these."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, checkpoint: dict) -> None:
        """Restore what :meth:`state_dict` saved; UserError if the model does not fit."""
        try:
            self.model.load_state_dict(checkpoint["model"])
        except RuntimeError as err:
            first_line = str(err).strip().splitlines()[0]
            raise UserError(
                f"the checkpoint's model does not fit this network: {first_line}"
            ) from None
        self.optimizer.load_state_dict(checkpoint["optimizer"])

    def data_signature(self) -> dict:
        """A description of the data that a resumed run must find again."""
        return {}

    def progress_postfix(self, row: dict) -> dict:
        """What the epoch bar shows after an epoch."""
        return {}

    def finish(self) -> None:
        """Called on rank 0 after the last epoch (figures)."""

    # -- the loop
    def start_epoch(self, epoch: int) -> int:
        """Seed every generator for ``epoch``; returns the epoch's seed."""
        seed = epoch_seed(self.config.seed, epoch)
        seed_everything(seed)
        self.generator.manual_seed(seed)
        return seed

    def checkpoint(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": asdict(self.config),
            "data": self.data_signature(),
            "epoch": len(self.history),
            **self.state_dict(),
            "rng": rng_state(self.generator),
            "history": self.history,
        }

    def load(self, checkpoint: dict) -> None:
        """Restore from a checkpoint, after checking that it is of this experiment and data."""
        stored = type(self.config).from_dict(checkpoint["config"])
        check_same_experiment(stored, self.config, self.out_dir)
        signature = self.data_signature()
        if checkpoint["data"] != signature:
            differences = ", ".join(
                f"{key} {checkpoint['data'].get(key)} in the checkpoint, {value} now"
                for key, value in signature.items()
                if checkpoint["data"].get(key) != value
            )
            raise UserError(
                f"the data does not match the checkpoint's ({differences}); "
                "point --data-dir at the data the run started with"
            )
        self.load_state_dict(checkpoint)
        set_rng_state(checkpoint["rng"], self.generator)
        self.history = list(checkpoint["history"])

    def fit(self) -> list[dict]:
        """Run the remaining epochs, saving checkpoint and metrics after each; then finish."""
        done = len(self.history)
        epochs = tqdm(
            range(done + 1, self.config.epochs + 1),
            desc=self.description(),
            initial=done,
            total=self.config.epochs,
            disable=not self.progress,
        )
        for epoch in epochs:
            self.start_epoch(epoch)
            row = self.run_epoch(epoch)
            self.history.append(row)
            # Every rank builds the checkpoint (a collective may be needed to gather state);
            # rank 0 writes it.
            checkpoint = self.checkpoint()
            if self.dist.is_main:
                save_checkpoint(self.out_dir / CHECKPOINT_FILE, checkpoint)
                write_metrics(self.out_dir, self.history)
            self.dist.barrier()
            epochs.set_postfix(self.progress_postfix(row))
        epochs.close()
        if self.dist.is_main:
            self.finish()
        return self.history

    def description(self) -> str:
        return type(self).__name__


def run(
    make_loop,
    config,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Train ``make_loop(config, out_dir, progress)`` in ``out_dir``; returns the metric rows.

    ``resume``: continue from ``out_dir/checkpoint.pt`` (``config`` must be the stored one up to its
    runtime fields). Without it an existing run in ``out_dir`` is refused unless ``overwrite``.
    Nothing is written before every check that can be made without the data has passed.
    """
    out_dir = Path(out_dir)
    config.validate()
    distributed.setup(config.device, getattr(config, "dist_backend", "auto"))
    dist = distributed.current()
    # The directory is this run's from here on; a second run on it stops now.
    lock = dist.on_main(lambda: lock_run_dir(out_dir))
    try:
        checkpoint = load_checkpoint(out_dir / CHECKPOINT_FILE) if resume else None
        if checkpoint is not None:
            dist.on_main(lambda: check_config_file(out_dir, checkpoint, type(config)))
        if checkpoint is not None and config.epochs < checkpoint["epoch"]:
            raise UserError(
                f"the run in {out_dir} has done {checkpoint['epoch']} epochs, more than the "
                f"{config.epochs} asked; resume with --epochs {checkpoint['epoch']} or more"
            )
        dist.on_main(lambda: prepare_out_dir(out_dir, resume, overwrite))
        loop = make_loop(config, out_dir, progress)
        if checkpoint is not None:
            loop.load(checkpoint)
        if dist.is_main:
            write_config(out_dir, config)
        return loop.fit()
    finally:
        if lock is not None:
            lock.release()
