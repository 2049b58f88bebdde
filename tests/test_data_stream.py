"""Streamed data (data.streaming) and hf: sources: staging, the rows each path sees, refusals, and a worker's memory
under Ray Train on 1x and 10x the rows."""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pyarrow as pa
import pytest
import torch

from steward.data import DataError, load_splits, prepare_data
from steward.data.encode import encode_examples
from steward.data.prepare import _tables
from steward.data.stream import _read_file, read_staged
from steward.data.synthetic import synthetic_text
from steward.errors import StewardError
from steward.spec import validate_job

TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}


def text_rows(n: int, filler: int = 0) -> list[dict]:
    """Synthetic sentiment rows (text, label, group); a last word of `filler` characters makes a row heavy to hold
    and no heavier to tokenize or train on (it is cut at max_length)."""
    table = synthetic_text(0, num_samples=n, bias=0.2, noise=0.05)
    pad = " " + "z" * filler if filler else ""
    return [
        {"text": text + pad, "label": int(label), "group": str(group)}
        for text, label, group in zip(table["text"], table["label"], table["group"], strict=True)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def spec_for(source: str, base: Path, streaming: bool, train: dict | None = None, **data):
    raw = {
        "name": "stream",
        "output_dir": str(base / "runs"),
        "data": {
            "source": source,
            "input_column": "text",
            "label_column": "label",
            "group_columns": ["group"],
            "streaming": streaming,
            "max_length": 16,
            "batch_size": 64,
            "tokenizer": {"vocab_size": 300},
            **data,
        },
        "model": {"family": "transformer", "params": TINY_BERT},
        "train": {"epochs": 1, **(train or {})},
        "distributed": {"num_workers": 2, "strategy": "ddp"},
        "evaluate": {"metrics": ["accuracy", "loss"]},
    }
    return validate_job(raw, "test", base)


def staged_train(info) -> dict[str, torch.Tensor]:
    """What the Ray Data map makes of every staged train file, in file order (no Ray needed to call it)."""
    columns = ["text", "label"]
    encoded = [
        _read_file(pa.table({"path": [str(f)]}), columns, info.to_dict(), 16)
        for f in sorted(Path(info.stream_dir, "train").glob("part-*.parquet"))
    ]
    return {k: torch.from_numpy(np.concatenate([e[k] for e in encoded])) for k in encoded[0]}


def test_streamed_data_is_the_same_rows_encoded_the_same(tmp_path, monkeypatch):
    monkeypatch.setattr("steward.data.stream.ROWS_PER_FILE", 100)  # several files, as a large set has
    source = f"file:{write_jsonl(tmp_path / 'reviews.jsonl', text_rows(600))}"
    loaded = spec_for(source, tmp_path, streaming=False)
    _, tables = _tables(loaded)
    streamed = spec_for(source, tmp_path, streaming=True)
    info = prepare_data(streamed, tmp_path)
    splits = load_splits(streamed, info)

    assert sorted(splits) == ["test", "validation"]  # train is never loaded
    assert info.stream_rows == len(tables["train"]["text"]) == 480
    assert len(list(Path(info.stream_dir, "train").glob("part-*.parquet"))) == 5
    assert not Path(f"{info.stream_dir}.partial").exists()
    for role in ("train", "validation", "test"):  # the rows the in-memory path cuts, staged in the same order
        assert read_staged(info.stream_dir, role) == tables[role]
    for role in ("validation", "test"):
        assert splits[role].labels.tolist() == [int(v) for v in tables[role]["label"]]
        assert splits[role].groups["group"] == tables[role]["group"]
    expected = encode_examples(tables["train"], "text", "label", info, 16, "train")
    train = staged_train(info)  # what the Ray Data map feeds the workers
    assert sorted(train) == sorted(expected)
    assert all(torch.equal(train[k], expected[k]) for k in expected)


def test_a_bad_row_is_named_by_its_place_in_the_split_before_anything_is_staged(tmp_path, monkeypatch):
    monkeypatch.setattr("steward.data.stream.ROWS_PER_FILE", 100)
    rows = text_rows(300)
    rows[250]["text"] = None  # past the first staged file
    source = f"file:{write_jsonl(tmp_path / 'bad.jsonl', rows)}"
    spec = spec_for(source, tmp_path, streaming=True, splits={"train": "train", "test": "train"})
    with pytest.raises(DataError, match=r"data\.input_column\[train\]\[250\]: expected a string"):
        prepare_data(spec, tmp_path)
    assert not (tmp_path / "data").exists()


def test_streaming_is_refused_where_it_cannot_work(tmp_path):
    source = f"file:{write_jsonl(tmp_path / 'r.jsonl', text_rows(100))}"
    with pytest.raises(StewardError, match="streaming reads file: and hf: sources"):
        raw = {"name": "t", "data": {"source": "builtin:digits", "streaming": True}, "model": {"family": "cnn"}}
        validate_job(raw, "test", tmp_path)
    with pytest.raises(StewardError, match="streaming needs a validation or test split"):
        spec_for(source, tmp_path, streaming=True, splits={"train": 1.0})
    mitigated = spec_for(source, tmp_path, streaming=True, train={"mitigation": {"method": "reweigh"}})
    with pytest.raises(DataError, match=r"^data\.streaming: train\.mitigation"):
        prepare_data(mitigated, tmp_path)


def cache_hub_dataset(cache: Path, repo_id: str, parts: dict) -> None:
    """Write `parts` where `datasets.load_dataset(repo_id)` finds them offline: the datasets cache a first online
    load leaves behind (one folder per config/version/hash, an Arrow file per split, dataset_info.json)."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    name = repo_id.split("/")[-1]
    folder = cache / repo_id.replace("/", "___") / "default" / "0.0.0" / ("0" * 16)
    folder.mkdir(parents=True)
    splits = datasets.SplitDict(dataset_name=name)
    for split, part in parts.items():
        with ArrowWriter(path=str(folder / f"{name}-{split}.arrow")) as writer:
            writer.write_table(part.data.table)
            count, size = writer.finalize()
        splits.add(datasets.SplitInfo(split, num_bytes=size, num_examples=count, dataset_name=name))
    features = next(iter(parts.values())).features
    datasets.DatasetInfo(features=features, config_name="default", dataset_name=name, splits=splits).write_to_directory(
        str(folder)
    )


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_source_loads_a_hub_dataset_from_the_local_cache_offline(tmp_path, streaming):
    import datasets

    rows = text_rows(200)
    full = datasets.Dataset.from_list(rows)
    cache = tmp_path / "hf-cache"
    cache_hub_dataset(
        cache, "steward-test/reviews", {"train": full.select(range(160)), "test": full.select(range(160, 200))}
    )
    named = {"train": "train", "test": "test"}
    # The spec a user writes for a Hub dataset; `cache_dir` is a load_dataset option, as data.options are.
    spec = spec_for("hf:steward-test/reviews", tmp_path, streaming, splits=named, options={"cache_dir": str(cache)})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    info = prepare_data(spec, run_dir)
    splits = load_splits(spec, info)
    assert len(splits["test"]) == 40
    assert splits["test"].groups["group"] == [r["group"] for r in rows[160:]]
    assert splits["test"].labels.tolist() == [r["label"] for r in rows[160:]]
    assert ("train" in splits) is not streaming
    assert (info.stream_rows if streaming else len(splits["train"])) == 160
    with pytest.raises(DataError, match=r"^data\.source: the dataset 'steward-test/other' could not be loaded"):
        prepare_data(spec_for("hf:steward-test/other", tmp_path, streaming, options={"cache_dir": str(cache)}), None)


@pytest.mark.slow
def test_a_workers_peak_memory_does_not_grow_with_ten_times_the_rows(ray_local, tmp_path):
    """Heavy rows, light to train on: held in memory, the 10x file would add more than 5% to a worker's peak;
    streamed, each worker holds a few encoded batches at a time."""
    from steward.govern.card import read_card
    from steward.runs import create_run, read_history
    from steward.stages import train_model

    rows = text_rows(2000, filler=3000)
    peaks, sizes = {}, {}
    for times in (1, 10):
        path = write_jsonl(tmp_path / f"reviews-{times}x.jsonl", rows * times)
        spec = spec_for(f"file:{path}", tmp_path / f"{times}x", streaming=True)
        run_dir = create_run(spec)
        train_model(spec, run_dir)
        epoch = next(r for r in read_history(run_dir / "history.jsonl") if r["kind"] == "epoch")
        train_rows = round(2000 * times * 0.8)
        assert epoch["step"] == -(-(train_rows // 2) // 64)  # every row streamed once, an equal share per worker
        assert epoch["tokens_per_s"] > 0 and epoch["val_accuracy"] > 0
        assert read_card(run_dir)["training"]["tokens_per_s"] == epoch["tokens_per_s"]
        assert (run_dir / "model" / "reference.json").exists()  # profiled on the validation split, in memory
        peaks[times], sizes[times] = epoch["peak_memory_mb"], path.stat().st_size / 2**20
    assert sizes[10] - sizes[1] > 0.05 * peaks[1], (sizes, peaks)  # holding the data would break the bound below
    assert abs(peaks[10] - peaks[1]) <= 0.05 * peaks[1], peaks


def test_the_progress_bar_shows_tokens_per_second(tmp_path):
    import io

    from rich.console import Console

    from steward.train.progress import HistoryProgress

    history = tmp_path / "history.jsonl"
    step = {"kind": "step", "epoch": 1, "step": 5, "loss": 0.5, "lr": 1e-3, "tokens_per_s": 12345.6}
    history.write_text(json.dumps({"kind": "start", "epoch": 0}) + "\n" + json.dumps(step) + "\n")
    shown = io.StringIO()
    with HistoryProgress(history, epochs=2, console=Console(file=shown, width=200), interval=0.05):
        pass
    assert "tokens_per_s 1.235e+04" in shown.getvalue()
    epoch = {"kind": "epoch", "epoch": 1, "step": 10, "train_loss": 0.4, "samples_per_s": 80.0, "tokens_per_s": 9000.0}
    with history.open("a") as out:
        out.write(json.dumps(epoch) + "\n")
    shown = io.StringIO()
    with HistoryProgress(history, epochs=2, console=Console(file=shown, width=200), interval=0.05):
        pass
    assert "samples_per_s 80  tokens_per_s 9000" in shown.getvalue()
