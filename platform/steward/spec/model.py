"""The `model` section: a CNN, an LSTM or a Hugging Face Transformer, with typed parameters."""

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from steward.spec.base import Section

# Widths of layers: several times the widest published models, still a tensor torch can allocate.
MAX_WIDTH = 65_536


class CNNParams(Section):
    channels: list[Annotated[int, Field(ge=1, le=MAX_WIDTH)]] = Field(
        default_factory=lambda: [32, 64], min_length=1, max_length=64, description="Output channels per conv block."
    )
    kernel_size: int = Field(3, ge=1, le=11, description="Convolution kernel size (odd keeps the spatial size).")
    pool: bool = Field(True, description="2x2 max-pool after each block while the image is larger than 2x2.")
    hidden_size: int = Field(128, ge=1, le=MAX_WIDTH, description="Width of the hidden layer of the classifier head.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout before the classifier head.")


class LSTMParams(Section):
    hidden_size: int = Field(64, ge=1, le=MAX_WIDTH, description="LSTM hidden size per direction.")
    num_layers: int = Field(1, ge=1, le=16, description="Stacked LSTM layers.")
    bidirectional: bool = Field(True, description="Run a second LSTM right to left and concatenate.")
    embedding_dim: int = Field(64, ge=1, le=MAX_WIDTH, description="Token embedding size (token inputs only).")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout between layers and before the head.")


class TransformerParams(Section):
    model_type: str = Field("bert", description="Hugging Face architecture built from scratch (bert, gpt2, ...).")
    pretrained: str | None = Field(
        None, description="Path or hub id of a pretrained model and tokenizer; overrides the sizes below."
    )
    hidden_size: int = Field(128, ge=8, le=MAX_WIDTH, description="Hidden size (from scratch only).")
    num_layers: int = Field(2, ge=1, le=96, description="Transformer blocks (from scratch only).")
    num_heads: int = Field(2, ge=1, le=128, description="Attention heads; must divide hidden_size.")
    intermediate_size: int = Field(256, ge=8, le=4 * MAX_WIDTH, description="Feed-forward width (from scratch only).")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Hidden and attention dropout.")
    config_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Any other Hugging Face config attribute, passed through."
    )

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "TransformerParams":
        if self.pretrained is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size}); "
                f"try num_heads: {max(h for h in range(1, self.num_heads + 1) if self.hidden_size % h == 0)}"
            )
        return self


Task = Literal["classification", "causal_lm"]
ModuleName = Annotated[str, Field(min_length=1, max_length=200)]


class LoraAdapter(Section):
    type: Literal["lora"] = Field(description="Adapter kind: lora, low-rank updates of chosen weight matrices (peft).")
    r: int = Field(8, ge=1, le=4096, description="Rank of each low-rank update.")
    alpha: float = Field(16.0, gt=0.0, le=1e6, description="Updates are scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the input of each low-rank update.")
    target_modules: list[ModuleName] | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="Names (or name suffixes) of the Linear layers to adapt; unset: peft's choice for the "
        "architecture (bert: query, value; gpt2: c_attn); [all-linear]: every Linear layer but the output.",
    )


class CNNModel(Section):
    family: Literal["cnn"] = Field(description="Model family.")
    task: Literal["classification"] = Field("classification", description="What the model predicts.")
    params: CNNParams = Field(default_factory=CNNParams, description="CNN parameters.")


class LSTMModel(Section):
    family: Literal["lstm"] = Field(description="Model family.")
    task: Literal["classification"] = Field("classification", description="What the model predicts.")
    params: LSTMParams = Field(default_factory=LSTMParams, description="LSTM parameters.")


class TransformerModel(Section):
    family: Literal["transformer"] = Field(description="Model family.")
    task: Task = Field("classification", description="classification, or causal_lm for gpt2-style models.")
    params: TransformerParams = Field(default_factory=TransformerParams, description="Transformer parameters.")
    adapter: LoraAdapter | None = Field(
        None,
        description="Train only a LoRA adapter (and a classifier head) on frozen weights; the saved and served "
        "model has the adapter merged in. Unset: every weight trains.",
    )


ModelSpec = Annotated[CNNModel | LSTMModel | TransformerModel, Field(discriminator="family")]
