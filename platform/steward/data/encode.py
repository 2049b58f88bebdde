"""Raw values -> tensors: model inputs (token ids or float arrays), class ids, and the modality rule."""

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from steward.data.errors import DataError
from steward.data.info import DataInfo, Modality
from steward.data.tokenizer import load_tokenizer


def detect_modality(first: Any, family: str, column: str, source: str) -> tuple[Modality, tuple[int, ...] | None]:
    """Modality and per-row input shape from the first input value (None shape for text: set by max_length).

    Strings are text; 2-D numeric arrays are images for a CNN and [timesteps, features] sequences for an LSTM.
    """
    where = f"data.input_column {column!r} of {source}"
    if isinstance(first, str):
        if family == "cnn":
            raise DataError(
                "model.family", f"a cnn needs 2-D numeric inputs, but {where} holds text; use lstm or transformer"
            )
        return "text", None
    try:
        array = np.asarray(first, dtype=np.float32)
    except (TypeError, ValueError):
        raise DataError(
            "data.input_column", f"{where} holds {type(first).__name__} values; use text or 2-D numeric arrays"
        ) from None
    if array.ndim != 2:
        raise DataError(
            "data.input_column",
            f"{where} holds {array.ndim}-D values; "
            "use 2-D arrays ([height, width] for cnn, [timesteps, features] for lstm)",
        )
    if family == "transformer":
        shape = "x".join(map(str, array.shape))
        raise DataError("model.family", f"a transformer needs text, but {where} holds {shape} arrays; use cnn or lstm")
    return ("image" if family == "cnn" else "sequence"), tuple(array.shape)


def label_names(values: Sequence[Any], column: str) -> list[str]:
    """Sorted distinct labels as strings (numeric order when every label is a number)."""
    bad = [i for i, v in enumerate(values) if v is None or isinstance(v, (list, dict))]
    if bad:
        raise DataError(
            "data.label_column", f"{column!r} has no usable label in train row {bad[0]}; labels are ints or strings"
        )
    distinct = set(values)
    numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in distinct)
    ordered = sorted(distinct) if numeric else sorted(distinct, key=str)
    return list(dict.fromkeys(str(v) for v in ordered))


def encode_labels(values: Sequence[Any], names: list[str], split: str) -> Tensor:
    """Class ids (int64 [N]) of label values through the train split's label names."""
    ids = {name: i for i, name in enumerate(names)}
    keys = [str(v) for v in values]
    unknown = sorted({k for k in keys if k not in ids})
    if unknown:
        raise DataError(
            "data.label_column",
            f"labels {unknown[:5]} of the {split} split never occur in the train split (labels {names[:10]}); "
            "split the data so every class is in train",
        )
    return torch.tensor([ids[k] for k in keys], dtype=torch.int64)


NUMBERS = "fiu"  # numpy kinds of float, signed and unsigned integer arrays


def as_numbers(value: Any) -> np.ndarray | None:
    """`value` as a numeric array, or None when it holds anything else: numpy would take strings ("0.5") and
    booleans as numbers (booleans even silently, among numbers), and integers past 64 bits make an object array."""
    array = np.asarray(value)
    if array.dtype.kind not in NUMBERS:
        return None
    if isinstance(value, list) and bool in set(map(type, np.asarray(value, dtype=object).ravel())):
        return None
    return array


def encode_instances(
    instances: Sequence[Any], info: DataInfo, max_length: int, field: str = "instances"
) -> tuple[Tensor, Tensor | None]:
    """Raw instances -> (inputs, attention_mask), exactly as `load_splits` encodes a split.

    Text: strings -> int64 token ids [N, max_length] and an int64 mask, padded and truncated to max_length.
    Image / sequence: numeric arrays of shape info.input_shape -> float32 [N, *input_shape] and no mask.
    Raises DataError naming `field[i]` for the first bad instance.
    """
    if len(instances) == 0:
        empty = torch.zeros((0, max_length), dtype=torch.int64)
        return (empty, empty.clone()) if info.modality == "text" else (torch.zeros((0, *info.input_shape)), None)
    if info.modality == "text":
        return _encode_text(instances, info, max_length, field)
    return _encode_arrays(instances, info.input_shape, field), None


def encode_examples(
    table: dict[str, Any], input_column: str, label_column: str | None, info: DataInfo, max_length: int, role: str
) -> dict[str, Tensor]:
    """Training examples of a table's rows: inputs, labels and (text) attention_mask, as every split is encoded.

    Causal language modelling predicts the input ids; padding becomes -100, the index cross-entropy ignores.
    """
    inputs, mask = encode_instances(table[input_column], info, max_length, field=f"data.input_column[{role}]")
    if label_column is not None:
        labels = encode_labels(table[label_column], info.label_names, role)
    else:
        padding = mask == 0 if mask is not None else torch.zeros_like(inputs, dtype=torch.bool)
        labels = inputs.masked_fill(padding, -100)
    return {"inputs": inputs, "labels": labels} | ({"attention_mask": mask} if mask is not None else {})


def check_texts(instances: Sequence[Any], field: str = "instances") -> None:
    """Raise DataError naming `field[i]` for the first instance that is not a string."""
    for i, text in enumerate(instances):
        if not isinstance(text, str):
            raise DataError(f"{field}[{i}]", f"expected a string for text data, got {type(text).__name__}")


def _encode_text(instances: Sequence[Any], info: DataInfo, max_length: int, field: str) -> tuple[Tensor, Tensor]:
    check_texts(instances, field)
    if info.tokenizer_dir is None:
        raise DataError("tokenizer_dir", "text data needs the tokenizer saved by prepare_data; DataInfo has none")
    tokenizer = load_tokenizer(info.tokenizer_dir)
    encoded = tokenizer(
        list(instances), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return encoded["input_ids"].to(torch.int64), encoded["attention_mask"].to(torch.int64)


def _encode_arrays(instances: Sequence[Any], shape: tuple[int, ...], field: str) -> Tensor:
    try:  # one conversion for the common case; the loop below only runs to name the bad instance
        array = as_numbers(instances)
        if array is not None and array.shape[1:] == tuple(shape):
            with np.errstate(over="ignore"):  # past float32's range becomes inf, refused below
                array = array.astype(np.float32)
            if np.isfinite(array).all():
                return torch.from_numpy(np.ascontiguousarray(array))
    except (TypeError, ValueError, OverflowError):
        pass
    expected = "x".join(map(str, shape))
    for i, item in enumerate(instances):
        try:
            row = as_numbers(item)
        except (TypeError, ValueError, OverflowError):
            problem = f"expected a {expected} array of numbers, got rows of unequal lengths"
            raise DataError(f"{field}[{i}]", problem) from None
        if row is None:
            got = type(item).__name__ if np.ndim(item) == 0 else "values that are not all numbers"
            raise DataError(f"{field}[{i}]", f"expected a {expected} array of numbers, got {got}")
        if row.shape != tuple(shape):
            got = "x".join(map(str, row.shape)) or "a scalar"
            raise DataError(f"{field}[{i}]", f"expected a {expected} array of numbers, got shape {got}")
        with np.errstate(over="ignore"):
            finite = np.isfinite(row.astype(np.float32)).all()
        if not finite:
            problem = "contains NaN, infinity or a number past float32's range; clean or drop that row"
            raise DataError(f"{field}[{i}]", problem)
    raise DataError(field, f"expected a list of {expected} arrays of numbers")
