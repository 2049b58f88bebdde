"""Tokenizers for text data: a pretrained model's own, or WordPiece / BPE trained on the train split."""

import functools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from steward.data.errors import DataError
from steward.spec.data import TokenizerSpec

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def pretrained_tokenizer(pretrained: str) -> Any:
    """The tokenizer saved with a pretrained model, given a padding token if it has none (GPT-2 has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(pretrained)
    except Exception as err:  # missing files, offline hub id: the fix is the same path
        raise DataError(
            "model.params.pretrained",
            f"could not load a tokenizer from {pretrained!r}: {err}; give a local model folder",
        ) from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # padding is masked out, so reusing eos changes nothing
        else:
            tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    return tokenizer


def train_tokenizer(texts: Iterable[str], spec: TokenizerSpec) -> Any:
    """Train a WordPiece or byte-level BPE tokenizer on texts; wrap it so save_pretrained round-trips.

    Both kinds add [CLS] before and [SEP] after each text, so a classifier can read position 0.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    trainer: Any
    if spec.kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=spec.vocab_size, special_tokens=SPECIAL_TOKENS)
    else:
        # Byte-level BPE (GPT-2 style) never needs [UNK]: every byte is in the initial alphabet.
        tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(
            vocab_size=spec.vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet
        )
    tokenizer.train_from_iterator(texts, trainer)
    cls_sep = [(token, tokenizer.token_to_id(token)) for token in ("[CLS]", "[SEP]")]
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=cls_sep
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def save_tokenizer(tokenizer: Any, folder: Path) -> str:
    """save_pretrained into folder; return its absolute path as a string (what DataInfo records)."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    return str(folder)


def load_tokenizer(folder: str) -> Any:
    """The tokenizer saved at folder (cached: evaluation and serving encode many small batches)."""
    config = Path(folder) / "tokenizer_config.json"
    # The file's mtime is part of the key, so a tokenizer saved again into the same folder is read again.
    return _load_tokenizer(folder, config.stat().st_mtime_ns if config.exists() else 0)


@functools.lru_cache(maxsize=8)
def _load_tokenizer(folder: str, mtime_ns: int) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as err:
        raise DataError(
            "tokenizer_dir", f"no tokenizer could be loaded from {folder!r}: {err}; run prepare_data"
        ) from err
