"""The OpenAI-compatible request and reply shapes of a causal LM deployment: completions and chat completions, their
server-sent-event chunks, and OpenAI's error body. Refusals name the request field (`param`), as OpenAI's do.

Sampling fields OpenAI defines and this server does not implement (n > 1, penalties, logprobs) are refused by name
rather than ignored, so a client never gets text sampled otherwise than it asked.
"""

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from steward.serve.protocol import BadRequest, utf8_safe

MAX_STOP = 4  # stop sequences a request may give (OpenAI's limit)
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 300  # entries of logit_bias (OpenAI's limit)
MAX_MESSAGES = 256
UNION_BRANCHES = {"str", "int", "float", "bool"}
ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}


def error_body(err: BadRequest) -> dict:
    """OpenAI's error shape: the message, its type, and the request field at fault as `param`."""
    kind = ERROR_TYPES.get(err.status, "invalid_request_error" if err.status < 500 else "server_error")
    code = {401: "invalid_api_key", 404: "model_not_found"}.get(err.status)
    return {"error": {"message": f"{err.field}: {err.message}", "type": kind, "param": err.field, "code": code}}


class Request(BaseModel):
    """What completions and chat completions share: the model's name and how to sample."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=256)
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (serve.generation bounds it).")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy; higher: more random.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Sample from the likeliest tokens holding this share.")
    top_k: int = Field(0, ge=0, le=1_000_000, description="Sample from the k likeliest tokens; 0: all.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="The same seed and request give the same text.")
    stop: str | list[str] | None = Field(
        default_factory=list, description=f"Up to {MAX_STOP} sequences that end the text."
    )
    stream: bool = False
    stream_options: dict[str, bool] | None = Field(None, description="{include_usage: true}: a last usage chunk.")
    n: int = Field(1, ge=1, le=1, description="Texts to generate; this server generates one a request.")
    logit_bias: dict[str, float] | None = Field(None, description="Token id -> bias added to its logit, -100..100.")
    user: str | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"{len(stops)} stop sequences; give at most {MAX_STOP}")
        for stop in stops:
            if not stop or len(stop) > MAX_STOP_CHARS:
                raise ValueError(f"each stop sequence holds 1 to {MAX_STOP_CHARS} characters")
            _check_text(stop)
        return stops

    @field_validator("stream_options")
    @classmethod
    def _options(cls, value: dict[str, bool] | None) -> dict[str, bool] | None:
        unknown = sorted(set(value or {}) - {"include_usage"})
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r}; the one option is include_usage")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value and len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"{len(value)} entries; give at most {MAX_LOGIT_BIAS}")
        for token, bias in (value or {}).items():
            if not token.isdigit() or not -100 <= bias <= 100:
                raise ValueError(f"{utf8_safe(token)!r}: keys are token ids, values biases from -100 to 100")
        return value


class CompletionRequest(Request):
    prompt: str = Field(description="The text to continue.")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        return _check_text(value)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = Field(None, max_length=64)

    @field_validator("content")
    @classmethod
    def _content(cls, value: str) -> str:
        return _check_text(value)


class ChatRequest(Request):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, description="max_tokens under its newer name.")


def _check_text(value: str) -> str:
    if utf8_safe(value) != value:
        raise ValueError("not valid UTF-8 (lone surrogate escape)")
    if "\x00" in value:
        raise ValueError("holds a NUL character; remove it")
    return value


def validated(schema: type[Request], payload: Any) -> Any:
    """`payload` as `schema`, or BadRequest 400 naming the first field that is wrong and how."""
    if not isinstance(payload, dict):
        raise BadRequest(400, "body", f"expected a JSON object, got {type(payload).__name__}")
    try:
        return schema.model_validate(payload)
    except ValidationError as err:
        first = err.errors()[0]
        # The branch of a union that failed (stop's `str`, `list[str]`) is pydantic's name, not the request's.
        loc = [p for p in first["loc"] if not (isinstance(p, str) and ("[" in p or p in UNION_BRANCHES))]
        field = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[")
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "not supported by this server; remove it"
        raise BadRequest(400, field or "body", message) from None


class Reply:
    """The pieces of one request's replies: its id, creation time, model and kind (text or chat)."""

    def __init__(self, model: str, chat: bool) -> None:
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created, self.model, self.chat = int(time.time()), model, chat
        self._around: tuple[bytes, bytes] | None = None

    def whole(self, text: str, finish: str, usage: dict[str, int]) -> dict:
        """The non-streamed reply."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        choice |= {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        return self._envelope([choice], usage, chunk=False)

    def chunk(self, text: str, finish: str | None = None, first: bool = False) -> bytes:
        """One server-sent event carrying `text` (and, last, the finish reason)."""
        if finish is None and not first and text:  # the common event: its bytes around the text are made once
            if self._around is None:
                head, tail = self._chunk(PLACEHOLDER, None, False).split(PLACEHOLDER_JSON)
                self._around = head, tail
            return self._around[0] + json.dumps(text).encode() + self._around[1]
        return self._chunk(text, finish, first)

    def _chunk(self, text: str, finish: str | None, first: bool) -> bytes:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.chat:
            choice["delta"] = ({"role": "assistant"} if first else {}) | ({"content": text} if text or first else {})
        else:
            choice["text"] = text
        return event(self._envelope([choice], None, chunk=True))

    def usage_chunk(self, usage: dict[str, int]) -> bytes:
        return event(self._envelope([], usage, chunk=True))

    def _envelope(self, choices: list[dict], usage: dict[str, int] | None, chunk: bool) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        body = {"id": self.id, "object": kind + (".chunk" if chunk and self.chat else ""), "created": self.created}
        return body | {"model": self.model, "choices": choices, "usage": usage}


def event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
PLACEHOLDER = "\x00"  # never in generated text: _check_text refuses NUL in prompts, and a tokenizer's text has none
PLACEHOLDER_JSON = json.dumps(PLACEHOLDER).encode()


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
