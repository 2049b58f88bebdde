"""Adapters (model.adapter: LoRA through peft): what trains, what the optimizer and checkpoints see, the merged
model that is saved and served, Tune over r and alpha, and one ZeRO-3 run under Ray Train."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from safetensors.torch import load_file

from steward.data.info import DataInfo
from steward.models import build_model, check_fits, count_parameters, load_model, save_model
from steward.spec import SpecError, load_job
from steward.spec.model import TransformerModel
from steward.train.strategy import DDPEngine, trained_state
from steward.tune.space import trial_spec
from tests.conftest import JOBS

TEXT = DataInfo("text", (12,), num_classes=3, vocab_size=50, pad_token_id=0)
LM_TEXT = DataInfo("text", (12,), vocab_size=50, pad_token_id=0)
TINY = {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 32, "dropout": 0.0}
LORA = {"type": "lora", "r": 2, "alpha": 4}
# (model type, task, data, LoRA's trainable count: 2 layers x each target's r * (in + out), plus the head)
CASES = {
    # query and value (peft's choice for bert), 16 -> 16 each; the classifier head 16 x 3 + 3 trains whole
    "bert-classification": ("bert", "classification", TEXT, 2 * 2 * 2 * (16 + 16) + 16 * 3 + 3),
    # c_attn (peft's choice for gpt2), 16 -> 48; the tied lm_head stays frozen
    "gpt2-causal_lm": ("gpt2", "causal_lm", LM_TEXT, 2 * 2 * (16 + 48)),
}


def adapted(case: str, **adapter) -> tuple[TransformerModel, DataInfo, torch.nn.Module, int]:
    model_type, task, info, expected = CASES[case]
    spec = TransformerModel(
        family="transformer", task=task, params={**TINY, "model_type": model_type}, adapter={**LORA, **adapter}
    )
    torch.manual_seed(0)
    return spec, info, build_model(spec, info), expected


def tokens(info: DataInfo, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, info.vocab_size, (batch, info.input_shape[0]), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def step(engine: DDPEngine, spec: TransformerModel, info: DataInfo) -> None:
    from steward.models import task_loss

    ids, mask = tokens(info)
    labels = ids if spec.task == "causal_lm" else torch.tensor([0, 1, 2, 1])
    engine.backward_step(task_loss(spec.task, engine(ids, mask), labels))


def job_with(model: TransformerModel):
    job = "tiny-gpt.yaml" if model.task == "causal_lm" else "text-transformer.yaml"
    return load_job(JOBS / job, [f"model={json.dumps(model.model_dump(mode='json'))}"])


@pytest.mark.parametrize("case", CASES)
def test_only_the_adapter_and_head_train_and_the_optimizer_sees_only_them(case):
    spec, info, model, expected = adapted(case)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == expected
    assert all("lora_" in name or "modules_to_save" in name for name in trainable), sorted(trainable)
    engine = DDPEngine(model, job_with(spec), total_steps=10)
    stepped = {id(p) for group in engine.optimizer.param_groups for p in group["params"]}
    assert stepped == {id(p) for p in trainable.values()}

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    step(engine, spec, info)
    step(engine, spec, info)  # the second step moves lora_A too: its gradient is zero while lora_B is
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == set(trainable)
    kept, buffers = set(trained_state(model)), {name for name, _ in model.named_buffers()}
    assert set(trainable) <= kept and kept - set(trainable) <= buffers


def test_a_checkpoint_holds_only_what_trains_and_resumes_onto_a_rebuilt_model(tmp_path):
    spec, info, model, _ = adapted("bert-classification")
    engine = DDPEngine(model, job_with(spec), total_steps=10)
    step(engine, spec, info)
    engine.save(tmp_path)
    saved = torch.load(tmp_path / "ddp_state.pt", weights_only=True)["model"]
    assert {k for k in saved if "weight" in k or "bias" in k} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }

    torch.manual_seed(123)  # another seed: the adapter starts elsewhere, the frozen base is the same
    rebuilt = DDPEngine(build_model(spec, info), job_with(spec), total_steps=10)
    rebuilt.load(tmp_path)
    for (name, a), b in zip(model.state_dict().items(), rebuilt.module.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("case", CASES)
def test_the_saved_model_is_the_merged_one_and_predicts_the_same(tmp_path, case):
    spec, info, model, expected = adapted(case, dropout=0.1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # LoRA starts at B = 0: a merge of zeros would hide a wrong merge
    inputs = tokens(info)
    with torch.no_grad():
        adapted_logits = model.eval()(*inputs)
    save_model(tmp_path, model, model.state_dict(), spec, info)

    loaded, loaded_spec, _ = load_model(tmp_path)
    assert loaded_spec == spec
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), adapted_logits, rtol=1e-5, atol=1e-5)
    assert not any("lora" in key or "base_model" in key for key in load_file(tmp_path / "model.safetensors"))
    plain = build_model(spec.model_copy(update={"adapter": None}), info)
    metadata = json.loads((tmp_path / "model.json").read_text())
    assert metadata["num_parameters"] == count_parameters(loaded) == count_parameters(plain)
    summary = metadata["adapter"]
    assert summary["trainable_parameters"] == expected and summary["r"] == 2 and summary["alpha"] == 4
    assert summary["target_modules"] == (["query", "value"] if spec.params.model_type == "bert" else ["c_attn"])
    assert summary["trained_whole"] == (["classifier"] if spec.task == "classification" else [])


def test_target_modules_that_match_nothing_are_reported_with_the_layers_there_are():
    spec, info, _, _ = adapted("bert-classification")
    assert spec.adapter
    wrong = spec.adapter.model_copy(update={"target_modules": ["qkv"]})
    [problem] = check_fits(spec.model_copy(update={"adapter": wrong}), info)
    assert problem.startswith("model.adapter.target_modules:") and "'query'" in problem and "all-linear" in problem


def test_tune_sweeps_r_and_alpha_of_the_adapter():
    sweep = "{metric: val_accuracy, mode: max, search_space: "
    sweep += "{model.adapter.r: {choice: [4, 16]}, model.adapter.alpha: {uniform: [8, 32]}}}"
    spec = load_job(JOBS / "minilm-lora.yaml", [f"tune={sweep}"])
    assert spec.tune
    base = spec.model_dump(mode="json", exclude={"tune"})
    trial = trial_spec(base, {"model.adapter.r": 16, "model.adapter.alpha": 24.0}, spec.tune)
    adapter = getattr(trial.model, "adapter", None)
    assert adapter and (adapter.r, adapter.alpha) == (16, 24.0)
    with pytest.raises(SpecError, match="model.adapter.r"):
        load_job(
            JOBS / "minilm-lora.yaml",
            ["tune={metric: val_accuracy, mode: max, search_space: {model.adapter.r: {choice: [0, 8]}}}"],
        )


@pytest.mark.slow
def test_a_lora_run_under_zero3_changes_and_checkpoints_only_the_adapter_and_head(ray_local, tmp_path):
    from steward.govern.card import read_card
    from steward.govern.card_markdown import render_markdown
    from steward.models.transformer import merged_transformer
    from steward.runs import create_run
    from steward.stages import train_model
    from steward.train.checkpoint import STATE_FILE, consolidate_checkpoint

    tiny = "{model_type: bert, hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64, dropout: 0.0}"
    spec = load_job(
        JOBS / "text-transformer.yaml",
        [f"output_dir={tmp_path}", "data.options={num_samples: 400, bias: 0.2}", "data.batch_size=16"]
        + ["train.epochs=1", "train.optimizer.lr=1.0e-2", f"model.params={tiny}", "model.adapter={type: lora, r: 4}"]
        + ["distributed.num_workers=2", "distributed.strategy=deepspeed", "distributed.zero_stage=3"],
    )
    run_dir = create_run(spec)
    result = train_model(spec, run_dir)  # trains, evaluates the saved (merged) model, writes the card
    assert 0.0 <= result["overall"]["accuracy"] <= 1.0

    info = DataInfo.from_dict(json.loads((run_dir / "data_info.json").read_text()))
    untrained = build_model(spec.model, info)
    trainable = {name for name, p in untrained.named_parameters() if p.requires_grad}
    [checkpoint] = [p.parent for p in run_dir.rglob(STATE_FILE)]
    kept = set(consolidate_checkpoint(checkpoint, zero_stage=3))
    assert trainable <= kept and not kept - trainable - {name for name, _ in untrained.named_buffers()}

    # LoRA's B starts at zero, so the untrained model merged is the frozen base with the initial head.
    before = merged_transformer(untrained, untrained.state_dict(), spec.model.adapter, "classification").state_dict()
    after = load_model(run_dir / "model")[0].state_dict()
    changed = {name for name, tensor in after.items() if not torch.equal(tensor, before[name])}
    layer = "hf.bert.encoder.layer.0.attention.self"
    assert changed == {f"{layer}.query.weight", f"{layer}.value.weight", "hf.classifier.weight", "hf.classifier.bias"}

    card = read_card(run_dir)
    assert card["training"]["adapter"]["trainable_parameters"] == 2 * 4 * (32 + 32) + 32 * 2 + 2
    assert "Adapter: lora r=4 alpha=16 on query, value; trained whole: classifier" in render_markdown(card)
