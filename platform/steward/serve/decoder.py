"""Continuous batching for a causal LM replica: every running request advances one token per forward pass, with a
KV cache, and a request that arrives joins the running batch at the next step instead of waiting for it to end.

One thread a replica owns the model and the cache. Each step it admits waiting requests (their prompts run
together, left-padded, and their cache joins the batch's), drops requests whose client went away or whose text
reached a stop sequence, runs one forward pass over the rest and hands each its token. No HTTP, no Ray.
"""

import asyncio
import logging
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache

from steward.models.transformer import prompt_embedding
from steward.serve.lm import LanguageModel

logger = logging.getLogger("steward.serve")


@dataclass(frozen=True)
class Sampling:
    """How one request's tokens are chosen: greedy at temperature 0, else sampled from the top_k / top_p share."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: every token
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Token:
    """One generated token of a request; `finish` says why it is the last ("stop": the model ended the text,
    "length": max_tokens or the model's context), or "error" with no token when its pass failed."""

    id: int
    logprob: float
    finish: str | None = None


class Sequence:
    """One request being generated. The decoding thread sets its tokens; its handler reads them on its event loop
    and calls `end` when it wants no more (client gone, stop sequence reached)."""

    def __init__(self, prompt: list[int], sampling: Sampling) -> None:
        self.prompt, self.sampling = prompt, sampling
        self.loop = asyncio.get_running_loop()
        self.tokens: asyncio.Queue[Token] = asyncio.Queue()
        self.generator = None if sampling.seed is None else torch.Generator().manual_seed(sampling.seed)
        # the tokens chosen so far and their log-probabilities: the decoding thread appends, the handler reads
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.embedding: Any = None  # the prompt's embedding (numpy), when the decoder is asked for embeddings
        self.finished = False  # its last token is chosen
        self.ended: str | None = None  # why the handler ended it

    def end(self, reason: str) -> None:
        """No more tokens for this request; the decoding thread drops it before its next pass."""
        if self.ended is None:
            self.ended = reason


class Decoder:
    """The replica's decoding loop over at most `max_batch` requests at a time; `counts` holds what it did (tokens
    generated, requests by how they finished or ended, the largest batch), `running` how many requests it holds.
    With `embed`, each request's prompt embedding is taken from its prefill (for the monitor)."""

    def __init__(self, lm: LanguageModel, max_batch: int, embed: bool = False) -> None:
        self.lm, self.max_batch, self.embed = lm, max_batch, embed
        self.waiting: deque[Sequence] = deque()
        self.wake = threading.Condition()
        self.counts: Counter[str] = Counter()
        self.batch: list[Sequence] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros((0, 0), dtype=torch.long)  # [B, cached + 1]: which cached positions are real
        self.last = torch.zeros(0, dtype=torch.long)  # [B]: each request's newest token, not yet in the cache
        threading.Thread(target=self._loop, name="steward-decoder", daemon=True).start()

    @property
    def running(self) -> int:
        return len(self.batch) + len(self.waiting)

    def submit(self, sequence: Sequence) -> None:
        with self.wake:
            self.waiting.append(sequence)
            self.wake.notify()

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not self.waiting and not self.batch:
                    self.wake.wait()
                room = self.max_batch - len(self.batch)
                admitted = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
            try:
                with torch.inference_mode():
                    self._advance(admitted)
            except Exception:  # a bug must end its requests with an error, not the replica's decoding
                logger.exception("decoding step failed")
                self._deliver([(s, Token(-1, 0.0, "error")) for s in {*self.batch, *admitted}])
                self.counts["error"] += len({*self.batch, *admitted})
                self.batch, self.cache, self.mask, self.last = [], None, self.mask[:0, :0], self.last[:0]

    def _advance(self, admitted: list[Sequence]) -> None:
        self._keep([s for s in self.batch if s.ended is None])
        out: list[tuple[Sequence, Token]] = []
        if self.batch:
            logits = self._step()
            out += self._choose(self.batch, logits)
        self.counts.update(s.ended for s in admitted if s.ended is not None)
        admitted = [s for s in admitted if s.ended is None]
        if admitted:
            logits, cache, mask = self._prefill(admitted)
            out += self._choose(admitted, logits)
            self._join(admitted, cache, mask)
        self.last = torch.tensor([token.id for _, token in self._in_batch_order(out)], dtype=torch.long)
        self._deliver(out)
        self._keep([s for s, token in self._in_batch_order(out) if token.finish is None])

    def _in_batch_order(self, out: list[tuple[Sequence, Token]]) -> list[tuple[Sequence, Token]]:
        order = {id(s): i for i, s in enumerate(self.batch)}
        return sorted(out, key=lambda pair: order[id(pair[0])])

    def _step(self) -> Tensor:
        """One forward pass over the batch: each request's newest token, its position, the cache."""
        self.mask = torch.cat([self.mask, torch.ones((len(self.batch), 1), dtype=torch.long)], dim=1)
        positions = self.mask.sum(dim=1, keepdim=True) - 1
        output = self.lm.hf(
            input_ids=self.last[:, None],
            attention_mask=self.mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
        )
        self.cache = output.cache
        return output.logits[:, -1].float()

    def _prefill(self, admitted: list[Sequence]) -> tuple[Tensor, DynamicCache, Tensor]:
        """The prompts of `admitted` in one pass, left-padded: last-position logits, their cache and mask."""
        width = max(len(s.prompt) for s in admitted)
        ids = torch.zeros((len(admitted), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, s in enumerate(admitted):
            ids[row, width - len(s.prompt) :] = torch.tensor(s.prompt)
            mask[row, width - len(s.prompt) :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        output = self.lm.hf(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=DynamicCache(),
            use_cache=True,
            output_hidden_states=self.embed,
        )
        if self.embed:
            for s, row in zip(admitted, prompt_embedding(output.hidden_states[-1], mask).numpy(), strict=True):
                s.embedding = row
        return output.logits[:, -1].float(), output.cache, mask

    def _join(self, admitted: list[Sequence], cache: DynamicCache, mask: Tensor) -> None:
        """Add the admitted requests' cache to the batch's, the shorter one left-padded with masked positions."""
        if not self.batch:
            self.batch, self.cache, self.mask = admitted, cache, mask
            self.counts["largest_batch"] = max(self.counts["largest_batch"], len(self.batch))
            return
        width = max(self.mask.shape[1], mask.shape[1])
        ours, theirs = _layers(self.cache), _layers(cache)
        joined = [
            tuple(torch.cat([_pad_left(a, width), _pad_left(b, width)]) for a, b in zip(mine, new, strict=True))
            for mine, new in zip(ours, theirs, strict=True)
        ]
        self.cache = DynamicCache(ddp_cache_data=joined)
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
        self.batch = [*self.batch, *admitted]
        self.counts["largest_batch"] = max(self.counts["largest_batch"], len(self.batch))

    def _keep(self, kept: list[Sequence]) -> None:
        """Only `kept` stay in the batch (the others finished or ended); cache positions no request uses go."""
        self.counts.update(s.ended for s in self.batch if s.ended is not None and not s.finished and s not in kept)
        if len(kept) == len(self.batch):
            return
        if not kept:
            self.batch, self.cache, self.mask, self.last = [], None, self.mask[:0, :0], self.last[:0]
            return
        rows = torch.tensor([i for i, s in enumerate(self.batch) if s in kept])
        start = int((self.mask[rows].sum(dim=0) > 0).int().argmax())  # the first position a kept request uses
        sliced = [tuple(t[rows][:, :, start:] for t in kv) for kv in _layers(self.cache)]
        self.cache = DynamicCache(ddp_cache_data=sliced)
        self.mask, self.last = self.mask[rows][:, start:], self.last[rows]
        self.batch = kept

    def _choose(self, sequences: list[Sequence], logits: Tensor) -> list[tuple[Sequence, Token]]:
        """Each request's next token from its row of `logits`, with its log-probability under the model."""
        chosen = choose_tokens(logits, [s.sampling for s in sequences], [s.generator for s in sequences])
        logprobs = F.log_softmax(logits, dim=-1).gather(1, chosen[:, None])[:, 0].tolist()
        out = []
        for s, token, logprob in zip(sequences, chosen.tolist(), logprobs, strict=True):
            s.ids.append(token)
            s.logprobs.append(logprob)
            finish = None
            if token in self.lm.eos:
                finish = "stop"
            elif len(s.ids) >= s.sampling.max_tokens or len(s.prompt) + len(s.ids) >= self.lm.context:
                finish = "length"
            s.finished = finish is not None
            out.append((s, Token(token, logprob, finish)))
        self.counts["tokens"] += len(out)
        self.counts.update(t.finish for _, t in out if t.finish)
        return out

    def _deliver(self, out: list[tuple[Sequence, Token]]) -> None:
        """Hand the tokens to their handlers: one call into each event loop a step, not one a token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Sequence, Token]]] = {}
        for s, token in out:
            by_loop.setdefault(s.loop, []).append((s, token))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[Sequence, Token]]) -> None:
    for s, token in items:
        s.tokens.put_nowait(token)


def _layers(cache: DynamicCache | None) -> list[tuple[Tensor, Tensor]]:
    assert cache is not None
    layers: list[Any] = cache.layers  # DynamicLayer each: the decoder's caches are built as DynamicCache
    return [(layer.keys, layer.values) for layer in layers]


def _pad_left(t: Tensor, width: int) -> Tensor:
    """`t` with zeros before its positions (dim -2 of a cache tensor, dim 1 of a mask) up to `width`."""
    if t.dim() == 2:
        return F.pad(t, (width - t.shape[1], 0))
    return F.pad(t, (0, 0, width - t.shape[-2], 0))


def choose_tokens(logits: Tensor, sampling: list[Sampling], generators: list[torch.Generator | None]) -> Tensor:
    """The next token of each row: argmax at temperature 0, else a draw from softmax(logits / temperature) cut to
    each row's top_k and top_p. A row with a seed draws from its own generator, so its text repeats."""
    biased = [(row, token, bias) for row, s in enumerate(sampling) for token, bias in s.logit_bias.items()]
    if biased:
        rows, tokens, biases = zip(*biased, strict=True)
        logits = logits.index_put(
            (torch.tensor(rows), torch.tensor(tokens)), torch.tensor(biases, dtype=logits.dtype), accumulate=True
        )
    greedy = logits.argmax(dim=-1)
    if all(s.temperature == 0 for s in sampling):
        return greedy
    temperature = torch.tensor([s.temperature or 1.0 for s in sampling])[:, None]
    scaled = logits / temperature
    if any(s.top_k or s.top_p < 1 for s in sampling):
        scaled = _truncate(scaled, sampling)
    # A draw by the exponential race: argmax(p / E), E ~ Exp(1), picks token i with probability p_i.
    noise = torch.empty_like(scaled).exponential_()
    for row, generator in enumerate(generators):
        if generator is not None:
            noise[row] = torch.empty(scaled.shape[1]).exponential_(generator=generator)
    drawn = (F.softmax(scaled, dim=-1) / noise).argmax(dim=-1)
    return torch.where(torch.tensor([s.temperature == 0 for s in sampling]), greedy, drawn)


def _truncate(scaled: Tensor, sampling: list[Sampling]) -> Tensor:
    """Logits outside each row's top_k tokens and smallest set holding top_p of the probability set to -inf."""
    ordered, order = scaled.sort(dim=-1, descending=True)
    vocab = scaled.shape[1]
    top_k = torch.tensor([min(s.top_k or vocab, vocab) for s in sampling])[:, None]
    top_p = torch.tensor([s.top_p for s in sampling])[:, None]
    rank = torch.arange(vocab)[None, :]
    before = F.softmax(ordered, dim=-1).cumsum(dim=-1) - F.softmax(ordered, dim=-1)  # mass of the tokens ahead
    cut = (rank >= top_k) | (before >= top_p)
    cut[:, 0] = False  # the likeliest token always stays
    return scaled.scatter(1, order, ordered.masked_fill(cut, float("-inf")))
