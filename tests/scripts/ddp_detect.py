"""Run ``training.detect`` under torchrun and save each rank's model state (a test helper).

Usage: ``torchrun --nproc_per_node 2 tests/scripts/ddp_detect.py STATE_DIR <flags>``, with
the flags of training.detect. After training, rank r writes STATE_DIR/rank{r}.pt with every
parameter and buffer of its model.
"""

import os
import sys

import torch

from spikealign.trainer import detect
from training import detect as detect_cli

state_dir = sys.argv[1]
fit = detect.Detection.fit


def fit_and_save(self):
    history = fit(self)
    torch.save(self.model.state_dict(), os.path.join(state_dir, f"rank{self.dist.rank}.pt"))
    return history


detect.Detection.fit = fit_and_save
detect_cli.main(sys.argv[2:])
