"""Run an entry point under torchrun and save each rank's model state (a test helper).

Usage: ``torchrun --nproc_per_node 2 tests/scripts/ddp_states.py STATE_DIR MODULE <flags>``, with
MODULE ``training.run`` or ``training.detect`` and its flags. After training, rank r writes
STATE_DIR/rank{r}.pt with every parameter and buffer (feedback, batch-norm statistics) of its
model, so a test can check that the ranks stayed identical.
"""

import importlib
import os
import sys

import torch

from spikealign.trainer import loop

state_dir, module = sys.argv[1:3]
fit = loop.EpochLoop.fit


def fit_and_save(self):
    history = fit(self)
    torch.save(self.model.state_dict(), os.path.join(state_dir, f"rank{self.dist.rank}.pt"))
    return history


loop.EpochLoop.fit = fit_and_save  # every kind of run (classification, detection) ends here
importlib.import_module(module).main(sys.argv[3:])
