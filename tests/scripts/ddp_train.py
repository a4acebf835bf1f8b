"""Run ``training.run`` under torchrun and save each rank's model state (a test helper).

Usage: ``torchrun --nproc_per_node 2 tests/scripts/ddp_train.py STATE_DIR <training.run flags>``.
After training, rank r writes STATE_DIR/rank{r}.pt with every parameter and buffer (feedback,
batch-norm statistics) of its model, so a test can check that the ranks stayed identical.
"""

import os
import sys

import torch

from spikealign.trainer import classify
from training import run

state_dir = sys.argv[1]
fit = classify.Training.fit


def fit_and_save(self):
    history = fit(self)
    torch.save(self.model.state_dict(), os.path.join(state_dir, f"rank{self.dist.rank}.pt"))
    return history


classify.Training.fit = fit_and_save
run.main(sys.argv[2:])
