"""Training on several processes: ``torchrun --nproc_per_node 2`` on the CPU (gloo backend).

The digits runs are tiny (256 training examples, global batch 32 = 2 x 16). One module-level set of
runs: rule rdd (learned feedback set by rank 0's spiking phase and broadcast), two epochs straight,
and one epoch then resumed to two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spikealign.errors import UserError
from spikealign.trainer import TrainConfig, distributed

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--dataset", "digits", "--rule", "rdd", "--rdd-time", "0.6", "--limit-train", "256",
         "--limit-test", "100", "--batch-size", "32", "--device", "cpu",
         "--no-progress"]  # fmt: skip
TIME_COLUMNS = ("phase_s", "epoch_s")


def torchrun(
    state_dir: Path, *flags: str, entry: str = "training.run"
) -> subprocess.CompletedProcess:
    """``entry`` with ``flags`` on 2 processes; each rank saves its model state in ``state_dir``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--standalone", str(REPO / "tests" / "scripts" / "ddp_states.py"),
               str(state_dir), entry, *flags]  # fmt: skip
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIME_COLUMNS} for line in lines]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    dirs = {name: root / name for name in ("straight", "resumed")}
    for path in dirs.values():
        (path / "states").mkdir(parents=True)
    done = torchrun(dirs["straight"] / "states", *FLAGS, "--epochs", "2", "--out",
                    str(dirs["straight"] / "run"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    first = torchrun(dirs["resumed"] / "states", *FLAGS, "--epochs", "1", "--out",
                     str(dirs["resumed"] / "run"))  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = torchrun(dirs["resumed"] / "states", "--resume", "--epochs", "2", "--no-progress",
                       "--out", str(dirs["resumed"] / "run"))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert done.stdout.count("run written to") == 1  # rank 0 alone reports
    return dirs


def test_ranks_end_with_identical_parameters_and_feedback(ddp_runs):
    states = [torch.load(ddp_runs["straight"] / "states" / f"rank{r}.pt") for r in (0, 1)]
    assert states[0].keys() == states[1].keys()
    assert any(key.endswith("fc1.feedback") for key in states[0])
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_one_set_of_files_with_the_global_figures(ddp_runs):
    run_dir = ddp_runs["straight"] / "run"
    names = sorted(path.name for path in run_dir.iterdir())
    assert names == ["alignment.png", "checkpoint.pt", "config.json", "error.png",
                     "metrics.csv", "metrics.jsonl", "spikes"]  # fmt: skip
    assert sorted(p.name for p in (run_dir / "spikes").iterdir()) == [
        "epoch_001.h5",
        "epoch_002.h5",
    ]
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    saved = torch.load(ddp_runs["straight"] / "states" / "rank0.pt")
    for key, value in saved.items():
        assert torch.equal(checkpoint["model"][key], value), key
    for row in rows(run_dir):
        # 100 test examples split 50/50 over the ranks, reduced: a multiple of 1/100.
        assert round(row["test_error"] * 100, 6) == int(round(row["test_error"] * 100))
    config = json.loads((run_dir / "config.json").read_text())
    assert config["batch_size"] == 32  # the global batch


def test_resume_in_ddp_ends_like_an_uninterrupted_ddp_run(ddp_runs):
    straight, resumed = ddp_runs["straight"], ddp_runs["resumed"]
    assert rows(resumed / "run") == rows(straight / "run")
    a = torch.load(straight / "states" / "rank1.pt")
    b = torch.load(resumed / "states" / "rank1.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_nccl_without_cuda_is_a_user_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(UserError, match="nccl backend needs CUDA"):
        distributed.setup("cpu", "nccl")
    assert not torch.distributed.is_initialized()


def test_global_batch_must_split_over_the_ranks():
    group = distributed.Distributed(rank=1, world_size=3)
    assert group.local_batch_size(96) == 32
    with pytest.raises(UserError, match="multiple of 3"):
        group.local_batch_size(32)


def test_unknown_backend_is_a_config_error():
    with pytest.raises(UserError, match="unknown backend"):
        TrainConfig(dataset="digits", rule="fa", dist_backend="mpi").validate()
