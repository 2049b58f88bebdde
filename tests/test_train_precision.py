"""Precision and activation memory: bf16 under DDP and every ZeRO stage, fp16 with a gradient scaler, activation
checkpointing and ZeRO-3 parameter offload, each really trained; the engines' own behaviour checked in-process."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from steward.data.info import DataInfo
from steward.evaluate import evaluate_model, load_servable
from steward.models import build_model, task_loss
from steward.runs import create_run, read_history
from steward.spec import load_job
from steward.spec.load import SpecError
from steward.stages import train_model
from steward.train.strategy import DDPEngine, build_engine
from tests.conftest import JOBS, ROOT, STEWARD

STEWARD_BIN = str(Path(sys.executable).parent / "steward")
LM_TEXT = DataInfo("text", (16,), vocab_size=64, pad_token_id=0)


def gpt(*overrides):
    """tiny-gpt.yaml under DDP on one worker, with `overrides`."""
    base = ["distributed.strategy=ddp", "distributed.zero_stage=0", "distributed.num_workers=1"]
    return load_job(JOBS / "tiny-gpt.yaml", [*base, *overrides])


def tokens(seed=0, batch=4):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, LM_TEXT.vocab_size, (batch, LM_TEXT.input_shape[0]), generator=generator)
    return ids, torch.ones_like(ids)


def engine_for(spec, seed=0):
    torch.manual_seed(seed)
    return build_engine(build_model(spec.model, LM_TEXT), spec, total_steps=10, prepare=lambda model: model)


def saved_bytes_and_grads(engine, spec):
    """Bytes the forward pass keeps for the backward pass, and the gradients that backward gives."""
    kept = []

    def pack(tensor):
        kept.append(tensor.numel() * tensor.element_size())
        return tensor

    ids, mask = tokens()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = task_loss(spec.model.task, engine(ids, mask), ids)
    loss.backward()
    return sum(kept), {name: p.grad.clone() for name, p in engine.module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("adapter", [[], ["model.adapter={type: lora, r: 4}"]], ids=["full", "lora"])
def test_activation_checkpointing_keeps_less_for_backward_and_gives_the_same_gradients(adapter):
    plain, checkpointed = gpt(*adapter), gpt(*adapter, "train.activation_checkpointing=true")
    a, b = engine_for(plain), engine_for(checkpointed)
    assert b.module.hf.is_activation_checkpointing and not a.module.hf.is_activation_checkpointing
    a.train(), b.train()
    kept_plain, grads_plain = saved_bytes_and_grads(a, plain)
    kept_checkpointed, grads_checkpointed = saved_bytes_and_grads(b, checkpointed)
    # Dropout is 0 in tiny-gpt: the recompute is exact, so the gradients are the plain model's.
    assert grads_plain and grads_plain.keys() == grads_checkpointed.keys()  # under LoRA: the adapter's, reached
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_checkpointed[name], grad, msg=name)
    # Two layers: only each layer's input is kept, not its attention and MLP intermediates.
    assert kept_checkpointed < 0.6 * kept_plain, (kept_checkpointed, kept_plain)


def test_activation_checkpointing_and_fp16_are_refused_where_they_cannot_run():
    with pytest.raises(SpecError) as refused:
        load_job(JOBS / "quickstart.yaml", ["train.activation_checkpointing=true"])
    [problem] = refused.value.problems
    assert problem.path == "train.activation_checkpointing" and "family: transformer" in problem.message
    with pytest.raises(SpecError) as refused:
        load_job(JOBS / "tiny-gpt.yaml", ["train.precision=fp16"])  # ZeRO-2 on CPU
    [problem] = refused.value.problems
    assert problem.path == "train.precision" and "use_gpu" in problem.message and "strategy: ddp" in problem.message
    assert gpt("train.precision=fp16").train.precision == "fp16"  # DDP scales the loss itself
    assert load_job(JOBS / "tiny-gpt.yaml", ["train.precision=fp16", "distributed.use_gpu=true"])


def test_the_cli_refuses_checkpointing_a_cnn_with_exit_2_naming_the_field():
    args = ["validate", "jobs/quickstart.yaml", "--set", "train.activation_checkpointing=true"]
    done = subprocess.run([*STEWARD, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "train.activation_checkpointing" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def fp16_step(engine, spec, blow_up=1.0):
    ids, mask = tokens(seed=1)
    return engine.backward_step(task_loss(spec.model.task, engine(ids, mask), ids) * blow_up)


def test_fp16_under_ddp_scales_the_loss_and_skips_a_step_whose_gradients_overflow(tmp_path):
    spec = gpt("train.precision=fp16", "train.scheduler.warmup_steps=2")
    engine = engine_for(spec)
    assert isinstance(engine, DDPEngine) and engine.scaler.is_enabled()
    engine.train()
    before = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
    scale, lr = engine.scaler.get_scale(), engine.lr
    # A loss 1e30 times too large overflows fp16 in the backward pass: the step must leave the weights alone.
    assert fp16_step(engine, spec, blow_up=1e30)
    assert engine.scaler.get_scale() == scale / 2 and engine.lr == lr  # the schedule waits for a real step
    assert all(torch.equal(p, before[name]) for name, p in engine.module.named_parameters())
    while engine.lr == lr:  # a step at a lower scale, if the first real loss still overflows
        assert engine.global_step < 5, "no step was taken at a scale that fits fp16"
        fp16_step(engine, spec)
    changed = [name for name, p in engine.module.named_parameters() if not torch.equal(p, before[name])]
    assert changed and all(torch.isfinite(p).all() for p in engine.module.parameters())
    engine.save(tmp_path)
    resumed = engine_for(spec, seed=1)
    resumed.load(tmp_path)
    assert resumed.scaler.get_scale() == engine.scaler.get_scale() and resumed.global_step == engine.global_step


# Ray tier: each case trains a few steps on 2 workers. bf16 under ZeRO-2 is trained by test_train.py (quickstart
# runs ZeRO-2), so stage 2 is not trained again here; ZeRO-3 with parameter offload is the GPU fine-tune's own spec.
RUNS = {
    "ddp-bf16-checkpointed": ["distributed.strategy=ddp", "distributed.zero_stage=0", "train.precision=bf16"]
    + ["train.activation_checkpointing=true"],
    "ddp-fp16": ["distributed.strategy=ddp", "distributed.zero_stage=0", "train.precision=fp16"],
    "zero-0-bf16": ["distributed.zero_stage=0", "train.precision=bf16"],
    "zero-1-bf16-checkpointed": ["distributed.zero_stage=1", "train.precision=bf16"]
    + ["train.activation_checkpointing=true"],
}
STEPS = 4
SHORT = ["data.options.num_samples=320", "data.batch_size=16", "train.epochs=1", f"train.max_steps={STEPS}"]
SHORT += ["train.log_every_steps=1", "train.scheduler.warmup_steps=0"]


def assert_trains_and_saves(tmp_path, job, *overrides):
    """Train `job` for STEPS steps: losses finite and falling, and the saved model is the trained one."""
    spec = load_job(JOBS / job, [f"output_dir={tmp_path}", *SHORT, *overrides])
    run_dir = create_run(spec)
    result = train_model(spec, run_dir)
    history = read_history(run_dir / "history.jsonl")
    losses = [r["loss"] for r in history if r["kind"] == "step"]
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < losses[0], losses
    model, _ = load_servable(run_dir / "model")
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    # Its validation loss is the one the last epoch reported (in bf16/fp16 then, in fp32 now).
    [epoch] = [r for r in history if r["kind"] == "epoch"]
    reloaded = evaluate_model(run_dir / "model", spec, "validation")["overall"]["loss"]
    assert reloaded == pytest.approx(epoch["val_loss"], rel=0.02)
    assert math.isfinite(result["overall"]["perplexity"])
    return spec, model


@pytest.mark.slow
@pytest.mark.parametrize("run", sorted(RUNS))
def test_precision_and_sharding_train_a_transformer(ray_local, tmp_path, run):
    assert_trains_and_saves(tmp_path, "tiny-gpt.yaml", *RUNS[run])


@pytest.fixture(scope="module")
def small_gpt2(tmp_path_factory):
    """A folder `from_pretrained` reads as GPT-2: a 2-layer GPT2LMHeadModel and a byte-level BPE tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    folder = tmp_path_factory.mktemp("small-gpt2")
    bpe = ByteLevelBPETokenizer()
    text = ["Customers wrote reviews of the service, the product and the delivery."] * 20
    bpe.train_from_iterator(text, vocab_size=320, special_tokens=["<|endoftext|>"])
    end = "<|endoftext|>"
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=end, eos_token=end, unk_token=end)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2)
    config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


GPU_ONLY = ["distributed.use_gpu=false", "data.max_length=32", "train.optimizer.lr=2e-3"]


@pytest.mark.slow
def test_the_gpu_finetune_spec_trains_on_cpu_under_zero3_with_parameters_offloaded(ray_local, tmp_path, small_gpt2):
    offload = ["distributed.offload_params=cpu", f"model.params.pretrained={small_gpt2}"]
    spec, model = assert_trains_and_saves(tmp_path, "gpu-zero3-finetune.yaml", *GPU_ONLY, *offload)
    dist, train = spec.distributed, spec.train
    assert dist.zero_stage == 3 and dist.offload_params == "cpu" and dist.num_workers == 2
    assert train.precision == "bf16" and train.activation_checkpointing
    assert model.hf.config.n_layer == 2  # the pretrained folder's model, fine-tuned


def test_the_gpu_script_checks_its_specs_as_they_would_run(tmp_path):
    script = ROOT / "benchmarks" / "gpu_large_model.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "STEWARD": STEWARD_BIN, "OUT": str(tmp_path)}  # validation audits into the output folder
    done = subprocess.run([str(script), "--dry-run"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok jobs/bench-memory.yaml" in done.stdout and "ok jobs/gpu-zero3-finetune.yaml" in done.stdout
    assert "bench jobs/bench-memory.yaml --set distributed.use_gpu=true" in done.stdout
    assert "train jobs/gpu-zero3-finetune.yaml" in done.stdout
    # A bad override of the fine-tune stops the script before anything runs, naming the field.
    bad = subprocess.run(
        [str(script), "--dry-run", "--set", "train.precision=fp8"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and "train.precision" in bad.stdout + bad.stderr and "would run" not in bad.stdout
