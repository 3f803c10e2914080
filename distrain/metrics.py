"""Classification metrics that add up exactly across DDP ranks.

Usage:
    meter = ClassificationMeter(num_classes, device)
    for batch in val_loader:
        meter.update(logits, labels, valid)          # valid=False rows (padding) are ignored
    meter.all_reduce()                                # sums over ranks (no-op without a process group)
    meter.compute(class_names)                        # {'loss', 'top1', 'top5', 'count', 'per_class_acc', ...}

Everything is kept as sums (a confusion matrix, loss sum, top-5 hits, count), never as per-rank averages, so the
result of world size 1 and world size N over the same samples is identical, not just close. The validation loader
sends every sample exactly once to exactly one rank and marks padding `valid=False`, so the summed matrix equals a
single-process evaluation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class ClassificationMeter:
    def __init__(self, num_classes: int, device: torch.device | str = "cpu", topk: int = 5):
        self.num_classes = num_classes
        self.topk = min(topk, num_classes)
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)  # [true, pred]
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.topk_hits = torch.zeros((), dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        logits = logits.float()
        if valid is not None:
            valid = valid.to(logits.device)
            logits, labels = logits[valid], labels[valid]
        if labels.numel() == 0:
            return
        self.loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        pred = logits.argmax(1)
        self.confusion += torch.bincount(labels * self.num_classes + pred,
                                         minlength=self.num_classes ** 2).view(self.num_classes, -1)
        top = logits.topk(self.topk, dim=1).indices
        self.topk_hits += (top == labels[:, None]).any(1).sum()

    def all_reduce(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for t in (self.confusion, self.loss_sum, self.topk_hits):
                dist.all_reduce(t)

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    def compute(self, class_names: list[str] | None = None) -> dict:
        conf = self.confusion.cpu().numpy()
        out = summarize_confusion(conf, class_names)
        n = max(1, self.count)
        out["loss"] = float(self.loss_sum) / n
        out["top5"] = int(self.topk_hits) / n  # top-min(5, classes)
        return out


def summarize_confusion(conf: np.ndarray, class_names: list[str] | None = None) -> dict:
    """top-1, per-class accuracy (= recall), precision and F1 from a [true, pred] confusion matrix."""
    names = class_names or [str(i) for i in range(len(conf))]
    total = int(conf.sum())
    correct = np.diag(conf).astype(np.float64)
    support = conf.sum(1).astype(np.float64)
    predicted = conf.sum(0).astype(np.float64)
    recall = np.divide(correct, support, out=np.zeros_like(correct), where=support > 0)
    precision = np.divide(correct, predicted, out=np.zeros_like(correct), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(correct), where=denom > 0)
    return {
        "count": total,
        "top1": float(correct.sum() / total) if total else 0.0,
        "per_class_acc": {n: float(r) for n, r in zip(names, recall, strict=False)},
        "per_class_precision": {n: float(p) for n, p in zip(names, precision, strict=False)},
        "per_class_f1": {n: float(f) for n, f in zip(names, f1, strict=False)},
        "support": {n: int(s) for n, s in zip(names, support, strict=False)},
        "macro_f1": float(f1[support > 0].mean()) if (support > 0).any() else 0.0,
        "confusion": conf.tolist(),
    }


def reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over all ranks (a copy; `t` itself when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
