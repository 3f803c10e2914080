"""The validation core that training and `distrain eval` share: one rank's exact-once share, summed over ranks.

Usage:
    from distrain.validation import evaluate, evaluate_batches
    meter, worst, decode_errors = evaluate_batches(model, loader, prepare, num_classes, amp_dtype, cap=16)
    meter, worst, decode_errors = evaluate(model, loader, prepare, num_classes, amp_dtype, cap=16)  # DDP: all-reduced

`prepare(batch)` turns a loader batch into the model's input tensor on the device (distrain.data.BatchToDevice:
normalization, channels_last; or the GPU decoder). The loader gives every rank the same number of batches and marks
padding `valid=False`, and the meter keeps sums, so one rank and N ranks give the identical confusion matrix; the
training loop's per-epoch validation is `evaluate()`, so `distrain eval` on the split a run validated on reproduces
the run's val_top1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from distrain.metrics import ClassificationMeter


class Misclassified:
    """The most confident misclassifications seen so far: (confidence, key, image HWC uint8, true, predicted)."""

    def __init__(self, cap: int):
        self.cap, self.rows = cap, []

    def add(self, images, labels, probs, valid, keys) -> None:
        if self.cap <= 0:
            return
        conf, pred = probs.max(1)
        wrong = (pred != labels) & valid
        for i in torch.nonzero(wrong).flatten().tolist():
            self.rows.append((float(conf[i]), keys[i], images[i].cpu().numpy().transpose(1, 2, 0),
                              int(labels[i]), int(pred[i])))
        self.rows.sort(key=lambda r: -r[0])
        del self.rows[self.cap:]

    @staticmethod
    def merge(parts: list[list], cap: int) -> list:
        return sorted((r for part in parts for r in part), key=lambda r: -r[0])[:cap]


@torch.no_grad()
def evaluate_batches(model, loader, prepare, num_classes: int, amp_dtype=None, misclassified_cap: int = 0,
                     progress=None):
    """One rank's share: (meter, most confident mistakes, decode errors); nothing is reduced across ranks.

    progress: an object with `update(n)` (tqdm-like), advanced by the valid images of each batch."""
    device = next(model.parameters()).device
    model.eval()
    meter = ClassificationMeter(num_classes, device)
    top = Misclassified(misclassified_cap)
    decode_errors = 0
    for batch in loader:
        x = prepare(batch)
        labels = batch.labels.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        meter.update(logits, labels, batch.valid)
        if misclassified_cap > 0:
            top.add(prepare.images(batch) if hasattr(prepare, "images") else batch.images, batch.labels,
                    logits.float().softmax(1).cpu(), batch.valid, batch.keys)
        decode_errors += int(batch.decode_errors)
        if progress is not None:
            progress.update(batch.num_valid)
    return meter, top.rows, decode_errors


def evaluate(model, loader, prepare, num_classes: int, amp_dtype=None, misclassified_cap: int = 0):
    """Exact-once validation under DDP: this rank's share, then sums (and undecodable-sample counts) all-reduced and
    mistakes gathered."""
    meter, rows, decode_errors = evaluate_batches(model, loader, prepare, num_classes, amp_dtype, misclassified_cap)
    meter.all_reduce()
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:  # undecodable samples of every rank, so that rank 0 reports the whole split's count
        errors = torch.tensor([decode_errors], dtype=torch.int64, device=meter.confusion.device)
        dist.all_reduce(errors)
        decode_errors = int(errors.item())
    if misclassified_cap > 0 and distributed:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rows)
        rows = Misclassified.merge(gathered, misclassified_cap)
    return meter, rows, decode_errors
