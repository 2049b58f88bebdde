"""A causal language model as a replica serves it: the run's model and tokenizer, prompts encoded as training encoded
its text (chat messages through a template), and generated tokens decoded into text that stops at stop sequences.
No Ray, no HTTP.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steward.data.tokenizer import load_tokenizer
from steward.models.transformer import end_tokens, usable_positions
from steward.serve.model import ModelSource, run_metadata
from steward.serve.quantize import quantize_int8

# The template of a tokenizer that has none: one "role: content" line a message, then the assistant's turn.
SIMPLE_TEMPLATE = "{role}: {content}\n"
ASSISTANT_TURN = "assistant:"


@dataclass
class LanguageModel:
    """A run's causal LM ready for generation: the Hugging Face model, its tokenizer and its limits."""

    hf: Any  # the transformers model itself (forward with past_key_values), fp32 or int8
    tokenizer: Any
    source: ModelSource
    context: int  # positions the model holds: prompt and generated tokens together never pass it
    eos: frozenset[int]  # tokens that end a text as training's texts ended
    longest_token: int  # characters of the vocabulary's longest token: a text of n tokens holds at most n times it
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> str:
        """The run id, suffixed with the precision when it is not the trained fp32."""
        return Path(self.source.run_dir).name + ("-int8" if self.source.int8 is not None else "")

    @property
    def vocab_size(self) -> int:
        return int(self.hf.config.vocab_size)

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt: as training encoded a text (its leading special token included), without the
        token that ends a text, so that generation continues it."""
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        if ids and ids[-1] in self.eos:
            ids.pop()
        return ids

    def chat_prompt(self, messages: list[tuple[str, str]]) -> str:
        """The prompt text for (role, content) messages, ending where the assistant's reply begins: the
        tokenizer's own chat template, else one `role: content` line a message."""
        if getattr(self.tokenizer, "chat_template", None):
            turns = [{"role": role, "content": content} for role, content in messages]
            return str(self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False))
        return (
            "".join(SIMPLE_TEMPLATE.format(role=role, content=content) for role, content in messages) + ASSISTANT_TURN
        )

    def decode(self, ids: list[int]) -> str:
        # No clean-up of spaces: the text of n tokens must be a prefix of the text of n + 1 for streaming.
        return str(self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))


def open_language_model(source: ModelSource) -> LanguageModel:
    """The run's causal LM as a replica serves it: int8 (Linear layers) when its gate passed."""
    from steward.evaluate.run import load_servable

    run_dir = Path(source.run_dir)
    model, info = load_servable(run_dir / "model")
    if source.int8 is not None:
        model = quantize_int8(model)
    hf: Any = model.hf
    tokenizer = load_tokenizer(str(info.tokenizer_dir))
    context = usable_positions(hf.config) or source.max_length
    longest = max(len(token) for token in tokenizer.get_vocab())
    metadata = run_metadata(run_dir, source.spec_hash)
    return LanguageModel(hf.eval(), tokenizer, source, context, end_tokens(hf, tokenizer), longest, metadata)


class TextStream:
    """Generated token ids in, text out: each piece is sent once it can no longer be part of a stop sequence (nor
    half of a UTF-8 character); the text ends before the first stop sequence, which is never sent.

    Each token is decoded with the few before it (whose text is known), not the whole text again: a byte-level
    tokenizer's text of a token can depend on its neighbours."""

    def __init__(self, lm: LanguageModel, stop: list[str]) -> None:
        self.lm, self.stop = lm, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # the decoded text so far
        self.prefix = self.read = 0  # ids[prefix:read] decode to the end of `text`
        self.sent = 0  # characters of the text already handed out

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; returns the text now safe to send, and whether a stop sequence ended the text."""
        self.ids.append(token)
        known = self.lm.decode(self.ids[self.prefix : self.read])
        now = self.lm.decode(self.ids[self.prefix :])
        if now.endswith("\ufffd") or len(now) <= len(known):  # a character whose bytes are not all here yet
            return "", False
        self.text += now[len(known) :]
        self.prefix, self.read = self.read, len(self.ids)
        found = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if found:
            end = min(found)
            piece, self.sent = self.text[self.sent : end], end
            return piece, True
        safe = max(self.sent, len(self.text) - self.hold)
        piece, self.sent = self.text[self.sent : safe], safe
        return piece, False

    def flush(self) -> str:
        """What is left to send once generation ended without a stop sequence."""
        piece, self.sent = self.text[self.sent :], len(self.text)
        return piece
