"""What `steward bench` measures inside the training loop: steady-state step rate, first-step time, peak memory."""

import resource
import time

import torch
import torch.distributed as dist


def peak_memory_mb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepProbe:
    """Times optimizer steps after `warmup` of them, leaving out epoch boundaries (evaluation, checkpoints).

    Each rank times its own steps; `summary` pools them: samples and tokens add up across ranks, time is the
    slowest rank's (ranks wait for each other at every gradient reduction).
    """

    def __init__(self, warmup: int, steps: int, base_memory_mb: float):
        self.warmup, self.target, self.base_memory_mb = warmup, steps, base_memory_mb
        self.steps, self.timed, self.seconds, self.samples, self.tokens = 0, 0, 0.0, 0, 0
        self.first_step_at: float | None = None
        self._last: float | None = None
        self._pending = [0, 0]  # samples and tokens since the last optimizer step (gradient accumulation)

    @property
    def done(self) -> bool:
        """Every step asked for has been timed: training can stop (the same step on every rank)."""
        return self.timed >= self.target

    def pause(self) -> None:
        """The next step's interval starts at its own end, not at the previous epoch's last step."""
        self._last = None

    def batch(self, batch: dict, stepped: bool) -> None:
        """Count one micro-batch; on an optimizer step, time the interval since the previous step."""
        mask = batch.get("attention_mask")
        self._pending[0] += len(batch["labels"])
        self._pending[1] += int(mask.sum()) if mask is not None else 0
        if not stepped:
            return
        now = time.perf_counter()
        if self.first_step_at is None:
            self.first_step_at = time.time()
        self.steps += 1
        if self._last is not None and self.steps > self.warmup:
            self.timed, self.seconds = self.timed + 1, self.seconds + now - self._last
            self.samples, self.tokens = self.samples + self._pending[0], self.tokens + self._pending[1]
        self._last, self._pending = now, [0, 0]

    def summary(self, world: int) -> dict:
        """The pooled measurement (a collective: every rank calls it)."""
        sums = torch.tensor([self.samples, self.tokens], dtype=torch.float64)
        slowest = torch.tensor([self.seconds], dtype=torch.float64)
        memory = torch.tensor([[peak_memory_mb(), peak_memory_mb() - self.base_memory_mb]], dtype=torch.float64)
        memories = [torch.zeros_like(memory) for _ in range(world)]
        if dist.is_initialized():
            dist.all_reduce(sums)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            dist.all_gather(memories, memory)
        else:
            memories = [memory]
        seconds = slowest.item()
        return {
            "timed_steps": self.timed,
            "seconds": seconds,
            "samples_per_s": sums[0].item() / seconds if seconds else None,
            "tokens_per_s": sums[1].item() / seconds if seconds and sums[1] else None,
            "first_step_at": self.first_step_at,
            "peak_memory_mb": [m[0, 0].item() for m in memories],
            "memory_added_mb": [m[0, 1].item() for m in memories],
        }
