"""Run a model over one split: the labels, logits and per-row losses every evaluation starts from."""

import numpy as np
import torch
from torch import nn

from steward.data import Split
from steward.models import task_loss


@torch.no_grad()
def predict(model: nn.Module, data: Split, task: str, batch_size: int = 256) -> tuple[np.ndarray, ...]:
    """Labels, logits (classification; empty for language models) and per-row losses of one split."""
    labels, logits, losses = [], [], []
    for batch in data.batches(batch_size):
        out = model(batch["inputs"], batch.get("attention_mask")).float()
        rows = [task_loss(task, out[i : i + 1], batch["labels"][i : i + 1]) for i in range(len(out))]
        losses.append(torch.stack(rows))
        labels.append(batch["labels"])
        logits.append(out if task == "classification" else out[:, :0, 0])  # LM logits are not kept: too big
    return tuple(torch.cat(t).numpy() for t in (labels, logits, losses))
