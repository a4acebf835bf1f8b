"""Scores of a pass over the data: loss, classification error, mean average precision.

Sums stay on the device as tensors until :meth:`ScoreKeeper.result`, so a pass syncs with the device
once, not per batch.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import average_precision_score


def classification_error(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Number of wrong top-1 predictions (a tensor, so no device sync per batch)."""
    return (logits.argmax(dim=1) != targets).sum()


def mean_average_precision(
    scores: np.ndarray, targets: np.ndarray, ignore: np.ndarray | None = None
) -> float:
    """Mean over classes with at least one positive of sklearn's average precision.

    ``ignore`` (same shape, bool) leaves entries out of their class's score: VOC's images whose
    only objects of a class are marked difficult.
    """
    targets = targets > 0.5
    keep = np.ones_like(targets) if ignore is None else ~np.asarray(ignore, dtype=bool)
    precisions = [
        average_precision_score(targets[keep[:, k], k], scores[keep[:, k], k])
        for k in range(targets.shape[1])
        if targets[keep[:, k], k].any()
    ]
    return float(np.mean(precisions)) if precisions else float("nan")


class ScoreKeeper:
    """Accumulates loss and error (or scores for mAP) over the batches of one pass."""

    def __init__(self, multilabel: bool):
        self.multilabel = multilabel
        self.count = 0
        self._batch_losses: list[torch.Tensor] = []
        self._batch_errors: list[torch.Tensor] = []
        self._scores: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        batch = targets.shape[0]
        self.count += batch
        self._batch_losses.append(loss.detach() * batch)
        if self.multilabel:
            self._scores.append(logits.detach().float().cpu())
            self._targets.append(targets.detach().cpu())
        else:
            self._batch_errors.append(classification_error(logits.detach(), targets))

    def result(self, ignore: torch.Tensor | None = None, dist=None) -> tuple[float, float]:
        """(mean loss, error) or (mean loss, mAP) for multi-label data, ``ignore`` as in
        :func:`mean_average_precision` (rows in the order the batches came).

        ``dist`` (a :class:`~spikealign.trainer.distributed.Distributed`): the figures over the
        batches of every rank, so each rank returns the same global result.
        """
        device = self._batch_losses[0].device if self._batch_losses else torch.device("cpu")
        errors = torch.stack(self._batch_errors).sum() if self._batch_errors else 0
        # One tensor, one reduction and one device-to-host copy for the whole pass.
        totals = torch.zeros(3, dtype=torch.float64, device=device)
        if self._batch_losses:
            totals[0] = torch.stack(self._batch_losses).sum()
        totals[1] = errors
        totals[2] = self.count
        scores = torch.cat(self._scores) if self._scores else None
        targets = torch.cat(self._targets) if self._targets else None
        if dist is not None and dist.enabled:
            if dist.world_size > 1 and totals.device.type == "cpu" and _backend_is_nccl():
                totals = totals.cuda()
            dist.all_reduce(totals)
            if self.multilabel:
                scores, targets, ignore = _gather_rows(dist, scores, targets, ignore)
        loss_sum, error_sum, count = totals.tolist()
        count = max(count, 1)
        if self.multilabel:
            score = mean_average_precision(
                scores.numpy(), targets.numpy(), None if ignore is None else ignore.numpy()
            )
        else:
            score = error_sum / count
        return loss_sum / count, score


def _backend_is_nccl() -> bool:
    return torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl"


def _gather_rows(dist, *tables):
    """Concatenate each rank's rows of every table (None stays None), in rank order."""
    gathered = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, tables)
    return tuple(
        None if tables[i] is None else torch.cat([part[i] for part in gathered])
        for i in range(len(tables))
    )
