"""The plain alternative: the same model, data, seed and step as steward's DDP loop, under `torchrun`, no Ray.

Run by benchmarks/train_overhead.py as `torchrun --nproc_per_node 2 benchmarks/torchrun_baseline.py SPEC OUT`.
Writes per-epoch samples/s (all ranks' samples / epoch seconds, exactly as steward's loop counts them).
"""

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from steward.data import load_splits, prepare_data
from steward.models import build_model, task_loss
from steward.spec import load_job


def main(spec_path: str, out: str, *overrides: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = load_job(spec_path, list(overrides))
    torch.set_num_threads(max(1, int(spec.distributed.cpus_per_worker)))
    torch.manual_seed(spec.seed)
    info = prepare_data(spec, None)
    train = load_splits(spec, info)["train"]
    model = build_model(spec.model, info)
    ddp = DistributedDataParallel(model)
    opt = spec.train.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
    records = []
    for epoch in range(spec.train.epochs):
        ddp.train()
        started, samples = time.perf_counter(), 0
        for batch in train.batches(
            spec.data.batch_size, shuffle=True, seed=spec.seed, epoch=epoch, rank=rank, world_size=world, train=True
        ):
            loss = task_loss(
                spec.model.task, ddp(batch["inputs"], batch.get("attention_mask")).float(), batch["labels"]
            )
            loss.backward()
            if spec.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), spec.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()
            samples += len(batch["labels"])
        seconds = time.perf_counter() - started
        records.append({"epoch": epoch + 1, "samples_per_s": samples * world / seconds})
    if rank == 0:
        Path(out).write_text(json.dumps(records))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(*sys.argv[1:])
