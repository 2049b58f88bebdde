"""Ray tier: real Ray Train workers, real DeepSpeed engines (ZeRO 0-3), checkpoints and resume, on 2 CPUs."""

import functools
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from steward.data import load_splits, prepare_data
from steward.evaluate import evaluate_model, load_servable
from steward.runs import create_run, read_history
from steward.spec import load_job
from steward.stages import evaluate_target, train_model
from tests.conftest import JOBS
from tests.serving import trained_run

pytestmark = pytest.mark.slow

SMALL = ["data.batch_size=16", "train.log_every_steps=1", "train.scheduler.warmup_steps=0"]


def train(tmp_path, job, *overrides, run_dir=None):
    spec = load_job(JOBS / job, [f"output_dir={tmp_path}", *overrides])
    run_dir = run_dir or create_run(spec)
    result = train_model(spec, run_dir)
    return spec, run_dir, result, read_history(run_dir / "history.jsonl")


def step_losses(history):
    return [r["loss"] for r in history if r["kind"] == "step"]


# Stages 2 and 3 are trained below, step for step against DDP.
@pytest.mark.parametrize("stage", [0, 1])
def test_zero_stages_train_and_the_loss_goes_down(ray_local, tmp_path, stage):
    _, run_dir, result, history = train(
        tmp_path, "quickstart.yaml", *SMALL, f"distributed.zero_stage={stage}", "train.max_steps=30", "train.epochs=1"
    )
    losses = step_losses(history)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert (run_dir / "model" / "model.safetensors").exists() and (run_dir / "curves.png").exists()
    assert result["overall"]["accuracy"] > 0.5


# SGD, not Adam: Adam's first updates are ~lr * sign(grad), so a weight whose gradient is ~0 moves by +-lr on 1e-7
# of reduction-order noise, which hides whether sharding is exact. SGD's update is linear in the gradient.
COMPARED = [*SMALL, "model.params.dropout=0", "train.max_steps=15", "train.epochs=1", "train.optimizer.name=sgd"]
COMPARED += ["train.optimizer.lr=0.1"]


@pytest.fixture(scope="module")
def compared(ray_local, tmp_path_factory):
    """The runs of the DDP comparison, by their overrides: each trained once, then also checked after training."""

    @functools.cache
    def run(*overrides):
        return train(tmp_path_factory.mktemp("compared"), "quickstart.yaml", *COMPARED, *overrides)

    return run


# ZeRO-2 runs without clipping: DeepSpeed then skips the gradient norm, and its own default (clip at 1.0) must not
# come back when the spec says grad_clip: null.
@pytest.mark.parametrize(("stage", "clip"), [(3, ()), (2, ("train.grad_clip=null",))], ids=["zero-3", "zero-2-noclip"])
def test_zero_follows_ddp_on_the_same_seed_and_data(compared, stage, clip):
    _, _, _, ddp = compared("distributed.strategy=ddp", "distributed.zero_stage=0", *clip)
    _, _, _, zero = compared(f"distributed.zero_stage={stage}", *clip)
    a, b = step_losses(ddp), step_losses(zero)
    assert len(a) == len(b) == 15
    assert a[-1] < 0.7 * a[0]
    # The same maths in a different order: ZeRO-3 reduce-scatters and all-gathers where DDP all-reduces, so fp32
    # rounding (~1e-7 relative) differs and compounds over steps; 1e-4 relative leaves room for that and none for
    # a wrong gradient, a missed shard or a skipped step (each moves the loss by percents here).
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        assert math.isclose(x, y, rel_tol=1e-4), f"step {step + 1}: ddp {x:.6f} vs zero-{stage} {y:.6f}\n{a}\n{b}"


def test_consolidated_zero3_model_reloads_without_deepspeed_and_predicts_the_same(compared):
    spec, run_dir, _, history = compared("distributed.zero_stage=3")  # the ZeRO-3 run compared with DDP above
    last = [r for r in history if r["kind"] == "epoch"][-1]
    reloaded = evaluate_model(run_dir / "model", spec, "validation")
    model, _ = load_servable(run_dir / "model")
    assert not any("deepspeed" in type(m).__module__ for m in model.modules())
    assert reloaded["overall"]["accuracy"] == pytest.approx(last["val_accuracy"], abs=1e-9)
    assert reloaded["overall"]["loss"] == pytest.approx(last["val_loss"], rel=1e-4)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # The last checkpoint's ZeRO-3 shards, stitched by DeepSpeed's zero_to_fp32, are the same model.
    checkpoint = sorted(p for p in (run_dir / "train").glob("checkpoint_*") if p.is_dir())[-1]
    from_checkpoint, _ = evaluate_target(checkpoint, split="validation")
    assert from_checkpoint["overall"] == pytest.approx(reloaded["overall"], rel=1e-5)


def test_quality_lstm_on_digits(ray_local, tmp_path):
    _, run_dir, result, _ = train(tmp_path, "digits-lstm.yaml")
    assert result["overall"]["accuracy"] >= 0.95, result
    assert json.loads((run_dir / "metrics.json").read_text())["overall"] == result["overall"]


def test_quality_transformer_on_synthetic_text_with_groups(ray_local, tmp_path):
    _, run_dir, result, _ = train(tmp_path, "text-transformer.yaml")
    assert result["overall"]["accuracy"] >= 0.8, result
    assert set(result["groups"]["group"]) == {"a", "b"}
    assert (run_dir / "model" / "tokenizer" / "tokenizer.json").exists()


def test_minilm_finetune_with_cpu_offload(ray_local, tmp_path):
    overrides = ["data.options.num_samples=600", "train.epochs=2", "train.optimizer.lr=1e-4"]
    _, run_dir, result, history = train(tmp_path, "minilm-finetune.yaml", *overrides)
    epochs = [r for r in history if r["kind"] == "epoch"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert result["overall"]["accuracy"] > 0.7, result
    assert json.loads((run_dir / "model" / "hf_config" / "config.json").read_text())["hidden_size"] == 384


def test_tiny_gpt_language_model(ray_local, tmp_path):
    _, _, result, history = train(tmp_path, "tiny-gpt.yaml", "data.options.num_samples=800", "train.epochs=2")
    epochs = [r for r in history if r["kind"] == "epoch"]
    assert epochs[-1]["val_loss"] < epochs[0]["train_loss"]
    assert 1.0 < result["overall"]["perplexity"] < 200, result


def test_bf16_with_gradient_accumulation_trains_and_exports_fp32(ray_local, tmp_path):
    overrides = ["train.precision=bf16", "train.grad_accum_steps=2", "train.epochs=3", "train.early_stopping=null"]
    spec, run_dir, result, history = train(tmp_path, "quickstart.yaml", *overrides)
    epochs = [r for r in history if r["kind"] == "epoch"]
    micro_batches = load_splits(spec, prepare_data(spec, None))["train"].num_batches(32, world_size=2, train=True)
    assert epochs[-1]["step"] == 3 * micro_batches // 2  # one optimizer step per 2 micro-batches
    assert epochs[-1]["train_loss"] < 0.5 * epochs[0]["train_loss"]
    model, _ = load_servable(run_dir / "model")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert result["overall"]["accuracy"] > 0.9


def test_one_ddp_worker_on_a_jsonl_file_with_string_labels(ray_local, tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    pairs = zip(digits.images, digits.target, strict=True)
    rows = [{"pixels": (image / 16).tolist(), "digit": names[label]} for image, label in pairs]
    (tmp_path / "digits.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(
        "name: from-file\n"
        "data: {source: 'file:digits.jsonl', input_column: pixels, label_column: digit}\n"
        "model: {family: cnn}\n"
        "train: {epochs: 4}\n"
        "distributed: {num_workers: 1, strategy: ddp}\n"
    )
    spec = load_job(spec_file, [f"output_dir={tmp_path / 'runs'}"])
    run_dir = create_run(spec)
    result = train_model(spec, run_dir)
    assert result["overall"]["accuracy"] > 0.9, result
    _, info = load_servable(run_dir / "model")
    assert info.label_names == sorted(names) and info.modality == "image"


@pytest.mark.parametrize(("job", "overrides"), [("quickstart.yaml", ["model.params.channels=[8,16]"]),
                                                ("digits-lstm.yaml", ["model.params.hidden_size=32"])])  # fmt: skip
def test_the_serving_tests_trained_run_gives_the_same_model_whatever_ran_before(tmp_path, job, overrides):
    def trained_after(threads, seed, folder):
        torch.set_num_threads(threads)  # what an earlier test may leave behind: its thread count, its RNG draws
        torch.manual_seed(seed)
        rng = torch.get_rng_state()
        _, run_dir = trained_run(tmp_path / folder, job, *overrides, epochs=1)
        # and trained_run leaves the caller's settings as they were
        assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)
        return load_file(run_dir / "model" / "model.safetensors"), (run_dir / "metrics.json").read_text()

    saved = torch.get_num_threads()
    try:
        (a, metrics_a), (b, metrics_b) = trained_after(2, 1, "a"), trained_after(1, 99, "b")
    finally:
        torch.set_num_threads(saved)
    differ = [name for name in a if not torch.equal(a[name], b[name])]
    assert a.keys() == b.keys() and not differ, differ
    assert metrics_a == metrics_b
