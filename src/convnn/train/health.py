"""Signs that a run diverged, checked after every epoch and reported as one warning line each.

A run can fail quietly: training accuracy climbs while the model evaluated in eval mode
predicts one class (BatchNorm running statistics that no longer match the activations), or
the loss explodes at a learning rate meant for a larger batch. The checks compare an epoch's
numbers with what chance would give (loss ln C, accuracy 1/C for C classes):

- a training or validation loss that is not finite, or above :data:`EXPLODE` x ln C;
- validation accuracy near chance while training accuracy in the same epoch is well above it
  (a train/eval gap: train mode and eval mode compute different functions).
"""

from __future__ import annotations

import math

__all__ = ["EXPLODE", "epoch_warnings"]

EXPLODE = 10.0  # a loss this many times the chance level ln(C) has diverged
GAP_TRAIN = 0.3  # training accuracy at least this far above chance ...
GAP_SHARE = 0.25  # ... while validation keeps less than this share of that lead

HINT = (
    "lower optim.lr (set optim.lr_batch_size to scale a recipe's rate to this batch) or set "
    "train.grad_clip"
)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def epoch_warnings(row: dict, num_classes: int) -> list[str]:
    """The warnings of one ``metrics.csv`` row (empty when the epoch looks healthy)."""
    epoch = row["epoch"]
    chance_loss, chance_acc = math.log(max(num_classes, 2)), 1.0 / max(num_classes, 1)
    limit = EXPLODE * chance_loss
    has_val = math.isfinite(row.get("val_acc", math.nan))  # NaN: no validation split
    found = []
    for split, what in (("train", "training"), ("val", "validation")):
        loss = row.get(f"{split}_loss")
        if loss is None or (split == "val" and not has_val):
            continue
        if not math.isfinite(loss):
            found.append(f"epoch {epoch}: {what} loss is {loss}: the run diverged; {HINT}")
        elif loss > limit:
            found.append(
                f"epoch {epoch}: {what} loss {_fmt(loss)} is {_fmt(loss / chance_loss)}x the "
                f"chance level ln({num_classes}) = {_fmt(chance_loss)}: the run diverged; {HINT}"
            )
    train_acc, val_acc = row.get("train_acc"), row.get("val_acc")
    if (
        train_acc is not None
        and val_acc is not None
        and math.isfinite(train_acc)
        and math.isfinite(val_acc)
        and train_acc - chance_acc >= GAP_TRAIN
        and val_acc - chance_acc <= GAP_SHARE * (train_acc - chance_acc)
    ):
        found.append(
            f"epoch {epoch}: validation accuracy {val_acc:.3f} is near chance "
            f"({chance_acc:.3f}) while training accuracy is {train_acc:.3f}: the model "
            "computes something else in eval mode (BatchNorm running statistics that do not "
            f"match the activations?); {HINT}"
        )
    return found
