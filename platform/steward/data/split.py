"""Split: one split's tensors, and sharded batches that keep every rank in step."""

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor


@dataclass
class Split:
    """Rows of one split as pre-built tensors; `groups` ride along for per-group evaluation, never as inputs.

    inputs: float32 [N, H, W] (image), float32 [N, T, F] (sequence) or int64 [N, L] (text).
    labels: int64 [N] class ids, or int64 [N, L] for causal_lm (input ids with padding set to -100).
    sample_weight: float32 [N] per-row loss weights in training (reweighing), or None for equal weights.
    notes: what was done to the rows on the way (e.g. a mitigation's before / after label balance).
    """

    inputs: Tensor
    labels: Tensor
    attention_mask: Tensor | None = None
    groups: dict[str, list[str]] = field(default_factory=dict)
    sample_weight: Tensor | None = None
    notes: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def concat(self, other: "Split") -> "Split":
        """This split's rows followed by other's (the same encoding): a retrain on train + validation."""
        mask = None
        if self.attention_mask is not None and other.attention_mask is not None:
            mask = torch.cat([self.attention_mask, other.attention_mask])
        groups = {name: values + other.groups[name] for name, values in self.groups.items()}
        return Split(torch.cat([self.inputs, other.inputs]), torch.cat([self.labels, other.labels]), mask, groups)

    def take(self, rows: Tensor) -> "Split":
        """The given rows (int64 indices, repeats allowed), in that order."""
        mask = self.attention_mask[rows] if self.attention_mask is not None else None
        weight = self.sample_weight[rows] if self.sample_weight is not None else None
        groups = {name: [values[i] for i in rows.tolist()] for name, values in self.groups.items()}
        return Split(self.inputs[rows], self.labels[rows], mask, groups, weight, dict(self.notes))

    def rows_per_rank(self, world_size: int = 1, train: bool = False) -> int:
        """Rows each rank sees: training drops the tail (n // world_size); evaluation pads (ceil)."""
        _check_world(0, world_size)
        n = len(self)
        return n // world_size if train else -(-n // world_size)

    def num_batches(self, batch_size: int, *, world_size: int = 1, train: bool = False) -> int:
        """Batches every rank yields from `batches` with the same arguments (the same on all ranks)."""
        if batch_size < 1:
            raise ValueError(f"data.batch_size: must be at least 1, got {batch_size}")
        return -(-self.rows_per_rank(world_size, train) // batch_size)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        train: bool = False,
    ) -> Iterator[dict[str, Tensor]]:
        """This rank's batches of inputs, labels, weight, index (and attention_mask for text).

        Rows are ordered by a permutation seeded by (seed, epoch) when shuffle is set, and dealt to ranks in
        turn, so ranks never share a row. Every rank yields `num_batches(...)` batches, because DeepSpeed
        ZeRO-3 deadlocks when one rank runs a forward pass the others do not:

        - train=True drops the last n % world_size rows of the permutation (different rows each epoch when
          shuffled). The last batch may be smaller than batch_size; it is equally small on every rank.
        - train=False pads the permutation by wrapping around to a multiple of world_size; padded rows get
          weight 0.0, so a weighted metric counts every real row exactly once across all ranks.

        "weight" is float32 [B] (in training: sample_weight, or all ones); "index" is int64 [B] rows of this Split.
        """
        _check_world(rank, world_size)
        self.num_batches(batch_size)  # validates batch_size
        per_rank, n = self.rows_per_rank(world_size, train), len(self)
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        positions = np.arange(per_rank * world_size)[rank::world_size]
        index = torch.from_numpy(order[positions % n] if n else positions).to(torch.int64)
        weight = torch.from_numpy(positions < n).to(torch.float32)
        if train and self.sample_weight is not None:
            weight = self.sample_weight[index].to(torch.float32)
        for start in range(0, per_rank, batch_size):
            rows = index[start : start + batch_size]
            batch = {
                "inputs": self.inputs[rows],
                "labels": self.labels[rows],
                "weight": weight[start : start + batch_size],
            }
            batch["index"] = rows
            if self.attention_mask is not None:
                batch["attention_mask"] = self.attention_mask[rows]
            yield batch


def _check_world(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"rank must be in [0, world_size) and world_size >= 1; got rank={rank}, world_size={world_size}"
        )
