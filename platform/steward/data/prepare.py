"""The two entry points: `prepare_data` once on the driver, `load_splits` on every worker."""

import dataclasses
import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from steward.data.encode import (
    check_texts,
    detect_modality,
    encode_examples,
    encode_instances,
    encode_labels,
    label_names,
)
from steward.data.errors import DataError
from steward.data.info import DataInfo
from steward.data.mitigate import mitigate_train
from steward.data.partition import Columns, check_columns, parts_used, resolve_columns, split_rows, split_tables
from steward.data.privacy import REPORT_FILE, protect_source
from steward.data.sources import Source, load_source
from steward.data.split import Split
from steward.data.stream import STAGED, check_streamable, read_staged, stage_splits, staged_texts, train_roles
from steward.data.table import Table
from steward.data.tokenizer import pretrained_tokenizer, save_tokenizer, train_tokenizer
from steward.spec.job import JobSpec


def _tables(
    spec: JobSpec, report: dict | None = None, roles: list[str] | None = None
) -> tuple[Columns, dict[str, Table]]:
    """Load the source, apply the privacy section, cut the splits (all, or the given roles); the same rows for the
    same spec and seed.

    With `report` given, what the privacy section found and did is put into it (counts, never values).
    """
    source = load_source(spec.data, spec.seed)
    columns = resolve_columns(spec, source)
    if spec.privacy is not None:  # before splitting and tokenizing: nothing downstream sees raw PII
        parts = parts_used(source, spec.data.splits)
        check_columns(source, columns, parts)
        source, found = protect_source(source, columns, spec.privacy, list(dict.fromkeys(parts.values())))
        if report is not None:
            report.update(found)
    return columns, split_tables(source, columns, spec.data.splits, spec.seed, roles)


def raw_inputs(spec: JobSpec, split: str, n: int) -> list:
    """The first n raw instances of a split, exactly as a client would send them to the served model (JSON-able)."""
    columns, tables = _tables(spec, roles=[split])
    return [r.tolist() if hasattr(r, "tolist") else r for r in tables[split][columns.input][:n]]


def prepare_data(spec: JobSpec, run_dir: Path | None) -> DataInfo:
    """Check the data against the spec and describe it; for text, save a tokenizer under run_dir/"tokenizer".

    Every split's inputs and labels are checked here, on the driver, so workers never meet a bad row.
    The tokenizer is the pretrained model's own (transformer with params.pretrained) or a WordPiece / BPE
    tokenizer trained on the train split only, so validation and test text never shapes the vocabulary.
    With run_dir None the tokenizer goes to a fresh temporary folder. Raises DataError naming the spec field.
    """
    if spec.data.streaming:
        return _prepare_streamed(spec, run_dir)
    report: dict = {}
    columns, tables = _tables(spec, report)
    if report and run_dir is not None:
        (Path(run_dir) / REPORT_FILE).write_text(json.dumps(report, indent=2))
    info = _describe(spec, columns, tables["train"])
    for role, table in tables.items():
        _check_rows(table, role, columns, info)
    if info.modality != "text":
        return info
    return _with_tokenizer(spec, info, tables["train"][columns.input], run_dir)


def _with_tokenizer(spec: JobSpec, info: DataInfo, train_texts: Iterable, run_dir: Path | None) -> DataInfo:
    """info with the tokenizer saved under run_dir/"tokenizer" (a fresh temporary folder without run_dir)."""
    pretrained = getattr(spec.model.params, "pretrained", None)
    tokenizer = pretrained_tokenizer(pretrained) if pretrained else train_tokenizer(train_texts, spec.data.tokenizer)
    folder = _folder(run_dir, "tokenizer")
    return dataclasses.replace(
        info,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        tokenizer_dir=save_tokenizer(tokenizer, folder),
    )


def _folder(run_dir: Path | None, name: str) -> Path:
    return Path(run_dir) / name if run_dir is not None else Path(tempfile.mkdtemp(prefix=f"steward-{name}-"))


def _prepare_streamed(spec: JobSpec, run_dir: Path | None) -> DataInfo:
    """prepare_data for data.streaming: describe the train split from its first row and its labels, then stage
    every split into run_dir/"data" (checking each batch), then the tokenizer from the staged train text."""
    check_streamable(spec)
    source = load_source(spec.data, spec.seed)
    columns = resolve_columns(spec, source)
    chosen = split_rows(source, columns, spec.data.splits, spec.seed)
    part, rows = chosen["train"]
    sample = source.read(part, [columns.input], rows[:1] if rows is not None else np.arange(1))
    if columns.label:  # the label column alone: label names come from every train row
        sample[columns.label] = source.read(part, [columns.label], rows)[columns.label]
    info = _describe(spec, columns, sample)
    folder = _folder(run_dir, STAGED)
    counts = stage_splits(source, columns, chosen, folder, lambda role, t: _check_rows(t, role, columns, info))
    info = dataclasses.replace(info, stream_dir=str(folder.resolve()))
    info = dataclasses.replace(info, stream_rows=sum(counts[role] for role in train_roles(spec)))
    if info.modality != "text":
        return info
    return _with_tokenizer(spec, info, staged_texts(str(folder), "train", columns.input), run_dir)


def _describe(spec: JobSpec, columns: Columns, train: Table) -> DataInfo:
    """Modality, shape and classes from the train split (no tokenizer yet)."""
    modality, shape = detect_modality(train[columns.input][0], spec.model.family, columns.input, spec.data.source)
    names = label_names(train[columns.label], columns.label) if columns.label else []
    if columns.label and len(names) < 2:
        raise DataError("data.label_column", f"{columns.label!r} has a single class {names} in the train split")
    return DataInfo(
        modality=modality,
        input_shape=shape or (spec.data.max_length,),
        num_classes=len(names) if columns.label else None,
        label_names=names,
        group_columns=list(columns.groups),
    )


def _check_rows(table: Table, role: str, columns: Columns, info: DataInfo) -> None:
    """Raise DataError for the first input of the wrong type or shape, or a label train never saw."""
    field = f"data.input_column[{role}]"
    if info.modality == "text":
        check_texts(table[columns.input], field)
    else:
        encode_instances(table[columns.input], info, 0, field=field)
    if columns.label is not None:
        encode_labels(table[columns.label], info.label_names, role)


def load_splits(spec: JobSpec, info: DataInfo, roles: list[str] | None = None) -> dict[str, Split]:
    """The declared splits (train, and validation / test when the spec has them; or those of `roles` it has) as
    tensors.

    Deterministic in (spec, spec.seed), so every Ray worker builds the same rows; text is tokenized with the
    tokenizer at info.tokenizer_dir, padded and truncated to data.max_length. A streamed job's train split is
    streamed, never loaded: its validation and test come from the staged files (or, when those are gone, are cut
    from the source again).
    """
    wanted = [role for role in spec.data.splits if roles is None or role in roles]
    if spec.data.streaming:
        wanted = [role for role in wanted if role != "train"]
        if info.stream_dir and Path(info.stream_dir).is_dir():
            columns = resolve_columns(spec, Source(spec.data.source, {}))
            tables = {role: read_staged(info.stream_dir, role) for role in wanted}
        else:
            columns, tables = _tables(spec, roles=wanted)
    else:
        columns, tables = _tables(spec, roles=wanted)
    splits = {role: _split(table, role, columns, info, spec) for role, table in tables.items()}
    if (
        spec.train.mitigation is not None and "train" in splits
    ):  # group-balanced resampling or reweighing of the training rows only
        splits["train"] = mitigate_train(splits["train"], spec, info)
    return splits


def _split(table: Table, role: str, columns: Columns, info: DataInfo, spec: JobSpec) -> Split:
    encoded = encode_examples(table, columns.input, columns.label, info, spec.data.max_length, role)
    groups = {g: [str(v) for v in table[g]] for g in columns.groups}
    return Split(encoded["inputs"], encoded["labels"], encoded.get("attention_mask"), groups)
