"""A (bi)LSTM classifier over numeric sequences, image rows, or token ids."""

from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from steward.data.info import DataInfo
from steward.errors import StewardError
from steward.spec.model import LSTMParams


def numeric_input_size(info: DataInfo) -> int:
    """Features per timestep: F of a (T, F) sequence, W of an (H, W) image read row by row, C*W of (C, H, W)."""
    shape = tuple(info.input_shape)
    if info.modality == "sequence" and len(shape) == 2:
        return shape[1]
    if info.modality == "image" and len(shape) in (2, 3):
        return shape[-1] * (shape[0] if len(shape) == 3 else 1)
    raise StewardError(f"data.input_shape: an LSTM needs (T, F) sequences or (H, W) images, got {shape}")


class LSTMClassifier(nn.Module):
    """Embedding (token inputs) or identity (numeric inputs) -> LSTM -> dropout -> Linear.

    The sequence summary is the final hidden state of the last layer of each direction, computed on a
    packed sequence: the forward direction stops at the last real timestep and the backward direction
    starts there, so right padding never changes the output. Padding must be on the right.

    forward(inputs [B, T, F] floats or [B, L] token ids, attention_mask [B, T] with 1 = real) -> [B, num_classes].
    """

    def __init__(
        self,
        params: LSTMParams,
        num_classes: int,
        *,
        input_size: int | None = None,
        vocab_size: int | None = None,
        pad_token_id: int | None = None,
    ) -> None:
        super().__init__()
        if (input_size is None) == (vocab_size is None):
            raise ValueError("LSTMClassifier needs exactly one of input_size (numeric) or vocab_size (tokens)")
        self.embedding = None
        if vocab_size is not None:
            self.embedding = nn.Embedding(vocab_size, params.embedding_dim, padding_idx=pad_token_id)
            input_size = params.embedding_dim
        self.lstm = nn.LSTM(
            input_size=int(input_size or 0),
            hidden_size=params.hidden_size,
            num_layers=params.num_layers,
            batch_first=True,
            bidirectional=params.bidirectional,
            # torch applies this only between layers, and warns when there is just one.
            dropout=params.dropout if params.num_layers > 1 else 0.0,
        )
        directions = 2 if params.bidirectional else 1
        self.dropout = nn.Dropout(params.dropout)
        self.head = nn.Linear(directions * params.hidden_size, num_classes)

    def _embed(self, inputs: Tensor) -> Tensor:
        if self.embedding is not None:
            return self.embedding(inputs)
        if inputs.dim() == 4:  # [B, C, H, W] image: each row, across channels, is one timestep
            inputs = inputs.permute(0, 2, 1, 3).flatten(2)
        return inputs

    def forward(self, inputs: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Class logits [B, num_classes]."""
        x = self._embed(inputs)
        if attention_mask is None:
            _, (h_n, _) = self.lstm(x)
        else:
            _, (h_n, _) = self.lstm(pack_right_padded(x, attention_mask))
        directions = 2 if self.lstm.bidirectional else 1
        # h_n is [layers * directions, B, H]; keep the last layer's directions, side by side.
        last = h_n[-directions:].transpose(0, 1).reshape(x.shape[0], -1)
        return self.head(self.dropout(last))


def pack_right_padded(x: Tensor, attention_mask: Tensor) -> nn.utils.rnn.PackedSequence:
    """Pack [B, T, E] using the real lengths in a right-padded `attention_mask` [B, T]."""
    mask = attention_mask.bool()
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError("LSTM attention_mask must be right-padded (real tokens first, padding after)")
    # A row with no real token still needs one step; its output is then that of the pad embedding.
    lengths = mask.sum(dim=1).clamp(min=1).cpu()
    return pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)


def build_lstm(params: LSTMParams, info: DataInfo) -> LSTMClassifier:
    """The LSTM for sequence, image (row by row) or text data described by `info`."""
    num_classes = int(info.num_classes or 0)
    if info.modality == "text":
        return LSTMClassifier(params, num_classes, vocab_size=info.vocab_size, pad_token_id=info.pad_token_id)
    return LSTMClassifier(params, num_classes, input_size=numeric_input_size(info))


def lstm_problems(params: LSTMParams, info: DataInfo) -> list[str]:
    """Why `params` cannot be built for `info`, as "<field>: ..." strings."""
    if info.modality == "text":
        if not info.vocab_size:
            return ["data.tokenizer: text data has no vocab_size; the LSTM needs it to size its embedding"]
        return []
    try:
        numeric_input_size(info)
    except StewardError as error:
        return [str(error)]
    return []
