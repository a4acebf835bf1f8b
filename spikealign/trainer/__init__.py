"""Training with separate feedback weights: one skeleton for every kind of run.

Modules, along the seams of a run:

- :mod:`~spikealign.trainer.config`: :class:`TrainConfig` (every ``training.run`` flag), validation,
  per-epoch seeds;
- :mod:`~spikealign.trainer.rundir`: the run directory's files, atomic writes, checkpoints, random
  state;
- :mod:`~spikealign.trainer.distributed`: ``torchrun`` process groups, all rank logic;
- :mod:`~spikealign.trainer.loop`: the epoch loop shared by every kind of run (:class:`EpochLoop`,
  :func:`~spikealign.trainer.loop.run`);
- :mod:`~spikealign.trainer.scores`: loss, error and mean average precision of a pass;
- :mod:`~spikealign.trainer.classify`: image classification (the paper's net), :func:`train`;
- :mod:`~spikealign.trainer.plots`: figures and the summary table of run directories.

The names below are the package's public interface (``from spikealign import trainer``).
"""

from spikealign.trainer.classify import (
    EVAL_BATCH_SIZE,
    SUBSET_SEED,
    Training,
    _subset,
    build_model,
    default_workers,
    fc_alignment,
    layer_alignment,
    metric_columns,
    train,
)
from spikealign.trainer.config import (
    ALIGNMENT_KEYS,
    COMPILE_MODES,
    DECAYED_RULES,
    FC_LAYERS,
    LOADERS,
    RDD_LAYER_RULES,
    RUNTIME_FIELDS,
    TRAIN_RULES,
    TrainConfig,
    epoch_seed,
)
from spikealign.trainer.distributed import resolve_device
from spikealign.trainer.loop import EpochLoop
from spikealign.trainer.plots import plot_runs, summary_table
from spikealign.trainer.rundir import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_CSV,
    METRICS_JSONL,
    RunRecord,
    load_checkpoint,
    read_run,
    resume_config,
    save_checkpoint,
    write_atomic,
)
from spikealign.trainer.scores import ScoreKeeper, classification_error, mean_average_precision

__all__ = [
    "ALIGNMENT_KEYS",
    "COMPILE_MODES",
    "LOADERS",
    "CHECKPOINT_FILE",
    "CONFIG_FILE",
    "DECAYED_RULES",
    "EVAL_BATCH_SIZE",
    "EpochLoop",
    "FC_LAYERS",
    "LOADERS",
    "METRICS_CSV",
    "METRICS_JSONL",
    "RDD_LAYER_RULES",
    "RUNTIME_FIELDS",
    "RunRecord",
    "SUBSET_SEED",
    "ScoreKeeper",
    "TRAIN_RULES",
    "TrainConfig",
    "Training",
    "_subset",
    "build_model",
    "classification_error",
    "epoch_seed",
    "default_workers",
    "fc_alignment",
    "layer_alignment",
    "load_checkpoint",
    "mean_average_precision",
    "metric_columns",
    "plot_runs",
    "read_run",
    "resolve_device",
    "resume_config",
    "save_checkpoint",
    "summary_table",
    "train",
    "write_atomic",
]
