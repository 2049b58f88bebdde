"""What training, evaluation and serving need to know about the data, saved with every model."""

from dataclasses import asdict, dataclass, field
from typing import Literal

Modality = Literal["image", "sequence", "text"]


@dataclass(frozen=True)
class DataInfo:
    """Shape and vocabulary of the prepared data.

    image: float inputs [N, H, W]; sequence: float inputs [N, T, F]; text: token ids [N, L] with an attention mask.
    """

    modality: Modality
    input_shape: tuple[int, ...]
    num_classes: int | None = None  # None for causal language modelling
    label_names: list[str] = field(default_factory=list)
    vocab_size: int | None = None
    pad_token_id: int | None = None
    group_columns: list[str] = field(default_factory=list)
    tokenizer_dir: str | None = None
    stream_dir: str | None = None  # the staged splits of a streamed (data.streaming) run
    stream_rows: int | None = None  # rows training streams from stream_dir in an epoch (all workers together)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "DataInfo":
        return cls(**{**raw, "input_shape": tuple(raw["input_shape"])})
