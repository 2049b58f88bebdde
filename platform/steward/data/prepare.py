"""The two entry points: `prepare_data` once on the driver, `load_splits` on every worker."""

import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from steward.data.encode import check_texts, detect_modality, encode_instances, encode_labels, label_names
from steward.data.errors import DataError
from steward.data.info import DataInfo
from steward.data.mitigate import mitigate_train
from steward.data.partition import Columns, check_columns, parts_used, resolve_columns, split_tables
from steward.data.privacy import REPORT_FILE, protect_source
from steward.data.sources import load_source
from steward.data.split import Split
from steward.data.table import Table
from steward.data.tokenizer import pretrained_tokenizer, save_tokenizer, train_tokenizer
from steward.spec.job import JobSpec


def _tables(spec: JobSpec, report: dict | None = None) -> tuple[Columns, dict[str, Table]]:
    """Load the source, apply the privacy section, cut the splits; the same rows for the same spec and seed.

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
    return columns, split_tables(source, columns, spec.data.splits, spec.seed)


def raw_inputs(spec: JobSpec, split: str, n: int) -> list:
    """The first n raw instances of a split, exactly as a client would send them to the served model (JSON-able)."""
    columns, tables = _tables(spec)
    return [r.tolist() if hasattr(r, "tolist") else r for r in tables[split][columns.input][:n]]


def prepare_data(spec: JobSpec, run_dir: Path | None) -> DataInfo:
    """Check the data against the spec and describe it; for text, save a tokenizer under run_dir/"tokenizer".

    Every split's inputs and labels are checked here, on the driver, so workers never meet a bad row.
    The tokenizer is the pretrained model's own (transformer with params.pretrained) or a WordPiece / BPE
    tokenizer trained on the train split only, so validation and test text never shapes the vocabulary.
    With run_dir None the tokenizer goes to a fresh temporary folder. Raises DataError naming the spec field.
    """
    report: dict = {}
    columns, tables = _tables(spec, report)
    if report and run_dir is not None:
        (Path(run_dir) / REPORT_FILE).write_text(json.dumps(report, indent=2))
    info = _describe(spec, columns, tables["train"])
    for role, table in tables.items():
        _check_rows(table, role, columns, info)
    if info.modality != "text":
        return info
    pretrained = getattr(spec.model.params, "pretrained", None)
    train_texts = tables["train"][columns.input]
    tokenizer = pretrained_tokenizer(pretrained) if pretrained else train_tokenizer(train_texts, spec.data.tokenizer)
    folder = Path(run_dir) / "tokenizer" if run_dir is not None else Path(tempfile.mkdtemp(prefix="steward-tokenizer-"))
    return dataclasses.replace(
        info,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        tokenizer_dir=save_tokenizer(tokenizer, folder),
    )


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


def load_splits(spec: JobSpec, info: DataInfo) -> dict[str, Split]:
    """Every declared split (train, and validation / test when the spec has them) as tensors.

    Deterministic in (spec, spec.seed), so every Ray worker builds the same rows; text is tokenized with the
    tokenizer at info.tokenizer_dir, padded and truncated to data.max_length.
    """
    columns, tables = _tables(spec)
    splits = {role: _split(table, role, columns, info, spec) for role, table in tables.items()}
    if spec.train.mitigation is not None:  # group-balanced resampling or reweighing of the training rows only
        splits["train"] = mitigate_train(splits["train"], spec, info)
    return splits


def _split(table: Table, role: str, columns: Columns, info: DataInfo, spec: JobSpec) -> Split:
    field = f"data.input_column[{role}]"
    inputs, mask = encode_instances(table[columns.input], info, spec.data.max_length, field=field)
    if columns.label is not None:
        labels = encode_labels(table[columns.label], info.label_names, role)
    else:  # causal LM: predict the input ids; -100 is the index cross-entropy ignores, so padding costs nothing
        padding = mask == 0 if mask is not None else torch.zeros_like(inputs, dtype=torch.bool)
        labels = inputs.masked_fill(padding, -100)
    groups = {g: [str(v) for v in table[g]] for g in columns.groups}
    return Split(inputs=inputs, labels=labels, attention_mask=mask, groups=groups)
