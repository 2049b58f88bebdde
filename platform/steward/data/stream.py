"""Streamed training data (`data.streaming`): staged once as Parquet, read and encoded by Ray Data per worker.

The driver cuts the splits exactly as the in-memory path does and writes them into the run folder batch by batch
(`data/<role>/part-*.parquet`), checking each batch on the way, so a bad row fails before any worker starts and
nothing holds a whole split. Training reads the staged train split through a Ray Data pipeline (the staged files,
then a map_batches that reads and tokenizes one file a task); the TorchTrainer deals each worker its own shard
(`ray.train.get_dataset_shard`), so a worker's memory is bounded by a few batches, not by the data set. Validation
and test are read back in memory for evaluation.
"""

import functools
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from steward.data.encode import encode_examples
from steward.data.errors import DataError
from steward.data.info import DataInfo
from steward.data.partition import Columns
from steward.data.sources import Source
from steward.data.table import Table
from steward.spec.job import JobSpec

STAGED = "data"  # the run folder's staged splits
ROWS_PER_FILE = 2048  # rows per staged Parquet file: Ray Data reads a file per block, so it bounds a block's size
SHUFFLE_BATCHES = 8  # the local shuffle buffer, in batches: rows mix across this many batches of the stream


def check_streamable(spec: JobSpec) -> None:
    """Refuse, naming the fields, what needs the whole train split in one place."""
    problems = []
    if spec.privacy is not None:
        problems.append(("data.streaming", "the privacy section rewrites the whole table; stream without it"))
    if spec.train.mitigation is not None:
        problems.append(
            ("data.streaming", "train.mitigation resamples or reweighs the whole train split; stream without it")
        )
    DataError.raise_all(problems)


def stage_splits(
    source: Source,
    columns: Columns,
    chosen: dict[str, tuple[str, np.ndarray | None]],
    folder: Path,
    check: Callable[[str, Table], None],
) -> dict[str, int]:
    """Write every split's rows (the job's columns) under folder/<role>/, calling check(role, batch) on each batch
    first; return each split's row count.

    The splits are written into a sibling folder that replaces `folder` only when complete, so a driver that dies
    mid-way never leaves a partial split for a later run to train on.
    """
    import pyarrow.parquet as pq

    names = [c for _, c in columns.fields()]
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    counts: dict[str, int] = {}
    for role, (part, rows) in chosen.items():
        out = partial / role
        out.mkdir(parents=True)
        counts[role] = 0
        for i, batch in enumerate(source.arrow(part, names, rows).with_format("arrow").iter(batch_size=ROWS_PER_FILE)):
            try:
                check(role, batch.to_pydict())
            except DataError as err:  # name the row within the split, not within the batch
                shifted = [(_shift_row(field, counts[role]), message) for field, message in err.problems]
                raise DataError(*shifted[0], *shifted[1:]) from None
            pq.write_table(batch, out / f"part-{i:05d}.parquet")
            counts[role] += batch.num_rows
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return counts


def _shift_row(field: str, offset: int) -> str:
    """`data.input_column[train][5]` -> `...[offset + 5]`: a field naming a row of a batch names it in the split."""
    match = re.fullmatch(r"(.*)\[(\d+)\]", field)
    return f"{match[1]}[{offset + int(match[2])}]" if match else field


def staged_texts(folder: str, role: str, column: str) -> Iterator[str]:
    """One staged split's texts in order, read a file at a time (what a tokenizer is trained on)."""
    import pyarrow.parquet as pq

    for path in _files(folder, [role]):
        yield from pq.read_table(path, columns=[column]).column(column).to_pylist()


def read_staged(folder: str, role: str) -> Table:
    """A staged split read whole, as a Table (validation and test, for evaluation)."""
    import pyarrow.parquet as pq

    return pq.read_table(Path(folder) / role).to_pydict()


def train_roles(spec: JobSpec) -> list[str]:
    """The staged splits training streams: train, and validation when train.include_validation folds it in."""
    return ["train", "validation"] if spec.train.include_validation and "validation" in spec.data.splits else ["train"]


def train_stream(spec: JobSpec, info: DataInfo) -> Any:
    """The Ray Data pipeline of the training rows: the staged files, each read and encoded into model inputs by
    one task of a map_batches (a file per task, so a file's size bounds what a task holds)."""
    import ray.data

    if info.stream_dir is None:
        raise DataError("data.streaming", "the data was prepared without streaming; run prepare_data again")
    label = spec.data.label_column if info.num_classes is not None else None
    columns = [str(spec.data.input_column), *([label] if label else [])]
    files = _files(info.stream_dir, train_roles(spec))
    encode = functools.partial(_read_file, columns=columns, info=info.to_dict(), max_length=spec.data.max_length)
    # Ray Train reserves every CPU its workers ask for, and on a cluster they fill, a task asking for a CPU would wait
    # forever: these tasks ask for none and run on the cores the workers leave idle between steps, one task a
    # worker at a time so they never crowd the workers out.
    pool = ray.data.TaskPoolStrategy(size=spec.distributed.num_workers)
    paths = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    return paths.map_batches(encode, batch_size=1, batch_format="pyarrow", num_cpus=0, compute=pool)


def _read_file(paths: Any, columns: list[str], info: dict, max_length: int) -> dict[str, np.ndarray]:
    """map_batches: one staged file -> numpy inputs, labels (and attention_mask), encoded as training feeds them."""
    import pyarrow.parquet as pq

    table = pq.read_table(paths.column("path")[0].as_py(), columns=columns).to_pydict()
    label = columns[1] if len(columns) > 1 else None
    encoded = encode_examples(table, columns[0], label, DataInfo.from_dict(info), max_length, "train")
    return {name: tensor.numpy() for name, tensor in encoded.items()}


def stream_batches(iterator: Any, spec: JobSpec, epoch: int, rank: int) -> Iterator[dict[str, Tensor]]:
    """This worker's training batches for one epoch from its shard (a ray.data.DataIterator).

    The shard is shuffled within a buffer of SHUFFLE_BATCHES batches, seeded by (seed, epoch, rank). Every worker's
    shard has the same number of rows (Ray Train splits with equal=True), so every rank yields the same number of
    batches, which ZeRO-3 needs.
    """
    shuffle = spec.data.batch_size * SHUFFLE_BATCHES if spec.data.shuffle else None
    seed = (spec.seed * 1_000_003 + epoch * 7919 + rank) % 2**31
    for batch in iterator.iter_torch_batches(
        batch_size=spec.data.batch_size, local_shuffle_buffer_size=shuffle, local_shuffle_seed=seed
    ):
        batch["weight"] = torch.ones(len(batch["labels"]), dtype=torch.float32)
        yield batch


def _files(folder: str, roles: list[str]) -> list[str]:
    return sorted(str(p) for role in roles for p in (Path(folder) / role).glob("part-*.parquet"))
