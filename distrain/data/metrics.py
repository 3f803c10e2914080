"""Validation counts that add up across ranks: a confusion matrix over valid rows, summed with all_reduce.

Usage:
    from distrain.data.metrics import confusion_matrix, reduce_sum
    cm = torch.zeros(C, C, dtype=torch.int64, device=device)
    for batch in val_loader:
        logits = model(to_device(batch.images, device, mean, std))
        cm += confusion_matrix(logits.argmax(1), batch.labels.to(device), batch.valid.to(device), C)
    cm = reduce_sum(cm)                                 # identical on every rank, whatever the world size
    top1 = cm.diag().sum() / cm.sum()

The validation loader sends every sample exactly once to exactly one rank and marks padding `valid=False`, so
the summed matrix equals a single-process evaluation: world size 1 and 3 give the same counts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, num_classes: int
                     ) -> torch.Tensor:
    """int64 [C, C], rows = true class, columns = predicted, counting only rows where `valid`."""
    preds, labels = preds[valid], labels[valid]
    flat = labels.to(torch.int64) * num_classes + preds.to(torch.int64)
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over all ranks (a copy; `t` itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
