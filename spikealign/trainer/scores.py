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


def top_k_error(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Number of examples whose target is not among the ``k`` highest logits (k capped at the
    number of classes)."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top != targets[:, None]).all(dim=1).sum()


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


def batch_sums(
    loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, top_k: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(batch size * mean loss, errors, top-k errors or None) of one single-label batch, as
    tensors on its device."""
    logits = logits.detach()
    top_k_errors = None if top_k is None else top_k_error(logits, targets, top_k)
    return loss.detach() * len(targets), classification_error(logits, targets), top_k_errors


class ScoreKeeper:
    """Accumulates loss and error (or scores for mAP) over the batches of one pass; with
    ``top_k`` also the top-k error (single-label data)."""

    def __init__(self, multilabel: bool, top_k: int | None = None):
        self.multilabel = multilabel
        self.top_k = top_k
        self._batch_top_k: list[torch.Tensor] = []
        self.count = 0
        self._batch_losses: list[torch.Tensor] = []
        self._batch_errors: list[torch.Tensor] = []
        self._scores: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        batch = targets.shape[0]
        if self.multilabel:
            self.count += batch
            self._batch_losses.append(loss.detach() * batch)
            self._scores.append(logits.detach().float().cpu())
            self._targets.append(targets.detach().cpu())
            return
        self.add_sums(batch, *batch_sums(loss, logits, targets, self.top_k))

    def add_sums(
        self,
        count: int,
        loss_sum: torch.Tensor,
        errors: torch.Tensor,
        top_k_errors: torch.Tensor | None = None,
    ) -> None:
        """Add ``count`` single-label examples by their summed loss, errors (and top-k errors);
        for passes that keep these sums themselves (a CUDA-graphed pass)."""
        self.count += count
        self._batch_losses.append(loss_sum)
        self._batch_errors.append(errors)
        if self.top_k is not None:
            self._batch_top_k.append(top_k_errors)

    def result(self, ignore: torch.Tensor | None = None, dist=None) -> tuple[float, ...]:
        """(mean loss, error) or (mean loss, mAP) for multi-label data, ``ignore`` as in
        :func:`mean_average_precision` (rows in the order the batches came); the top-k error
        follows as a third value when the keeper has ``top_k``.

        ``dist`` (a :class:`~spikealign.trainer.distributed.Distributed`): the figures over the
        batches of every rank, so each rank returns the same global result.
        """
        device = self._batch_losses[0].device if self._batch_losses else torch.device("cpu")
        errors = torch.stack(self._batch_errors).sum() if self._batch_errors else 0
        # One tensor, one reduction and one device-to-host copy for the whole pass.
        totals = torch.zeros(4, dtype=torch.float64, device=device)
        if self._batch_losses:
            totals[0] = torch.stack(self._batch_losses).sum()
        totals[1] = errors
        totals[2] = self.count
        if self._batch_top_k:
            totals[3] = torch.stack(self._batch_top_k).sum()
        scores = torch.cat(self._scores) if self._scores else None
        targets = torch.cat(self._targets) if self._targets else None
        if dist is not None and dist.enabled:
            if dist.world_size > 1 and totals.device.type == "cpu" and _backend_is_nccl():
                totals = totals.cuda()
            dist.all_reduce(totals)
            if self.multilabel:
                scores, targets, ignore = _gather_rows(dist, scores, targets, ignore)
        loss_sum, error_sum, count, top_k_sum = totals.tolist()
        count = max(count, 1)
        if self.multilabel:
            score = mean_average_precision(
                scores.numpy(), targets.numpy(), None if ignore is None else ignore.numpy()
            )
        else:
            score = error_sum / count
        if self.top_k is not None:
            return loss_sum / count, score, top_k_sum / count
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
