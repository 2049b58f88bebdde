"""spec + run folder -> the Serve application of a causal LM: OpenAI-compatible generation endpoints.

Routes (under serve.route_prefix): POST /v1/completions and POST /v1/chat/completions (`stream: true` as server-sent
events ending in `data: [DONE]`), GET /v1/models, GET /healthz, GET /info and GET /monitor (when monitored). Every
route but /healthz takes the API key; every refusal is OpenAI's error JSON naming the request field (`param`). A
request's tokens come from the replica's decoder (steward.serve.decoder), which batches all running requests into one
forward pass a token; a request whose client goes away is dropped from it at the next token. Generated text reaches
the client as serve.output_pii allows; each finished completion is queued for the deployment's monitor.
"""

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from steward.serve.auth import key_is_valid, load_keys, presented_key
from steward.serve.decoder import Decoder, Sampling, Sequence
from steward.serve.lm import LanguageModel, TextStream, open_language_model
from steward.serve.lm_monitor import Completion, CompletionQueue
from steward.serve.model import ModelSource, model_source
from steward.serve.monitoring import ReplicaMonitor, monitor_target
from steward.serve.openai_api import DONE, ChatRequest, CompletionRequest, Reply, error_body, event, usage, validated
from steward.serve.options import DEPLOYMENT, app_name, deployment_options
from steward.serve.output_pii import OutputGuard
from steward.serve.protocol import BadRequest, parse_body, read_body
from steward.serve.quantize import GateResult
from steward.spec import JobSpec
from steward.spec.monitor import MonitorSpec
from steward.spec.privacy import PrivacySpec
from steward.spec.serve import GenerationSpec, ServeSpec

logger = logging.getLogger("steward.serve")
api = FastAPI(title="steward generation server", docs_url=None, redoc_url=None, openapi_url=None)


@dataclass(frozen=True)
class GenerationReplica:
    """What a generation replica needs, as plain data: its deployment's name, serve section and model, its monitor
    section, and the privacy section whose entity types serve.output_pii and the leak checks look for."""

    name: str
    serve: ServeSpec
    model: ModelSource
    monitor: MonitorSpec | None = None
    privacy: PrivacySpec = PrivacySpec()


class GenerationFailed(Exception):
    """The decoder's forward pass failed for this request (the replica's log has the traceback)."""


@api.exception_handler(BadRequest)
async def _refused(request: Request, err: BadRequest) -> JSONResponse:
    return JSONResponse(error_body(err), status_code=err.status, headers=err.headers)


@api.exception_handler(StarletteHTTPException)
async def _no_route(request: Request, err: StarletteHTTPException) -> JSONResponse:
    part = "method" if err.status_code == 405 else "path"
    refusal = BadRequest(err.status_code, part, f"{err.detail} ({request.method} {request.url.path})")
    return JSONResponse(error_body(refusal), status_code=err.status_code, headers=err.headers)


@api.exception_handler(Exception)
async def _failed(request: Request, err: Exception) -> JSONResponse:
    # A bug must not take the replica down or leak a traceback to the client; the log keeps the detail.
    logger.exception("unexpected error on %s", request.url.path)
    return JSONResponse(error_body(BadRequest(500, "server", f"internal error ({type(err).__name__})")), 500)


class EventStream(StreamingResponse):
    """Server-sent events; `on_close` runs however the stream ends (finished, client gone, cancelled)."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def pieces(sequence: Sequence, stream: TextStream) -> AsyncIterator[tuple[str, str | None, int]]:
    """(text, finish reason or None, tokens so far) as the decoder hands `sequence` its tokens; a stop sequence
    ends the request in the decoder too. Tokens that arrived while the last piece was being sent go out as one."""
    count = 0
    while True:
        tokens = [await sequence.tokens.get()]
        while not sequence.tokens.empty():
            tokens.append(sequence.tokens.get_nowait())
        text = []
        for token in tokens:
            if token.finish == "error":
                raise GenerationFailed
            count += 1
            piece, stopped = stream.push(token.id)
            text.append(piece)
            if stopped:
                sequence.end("stop_sequence")
                yield "".join(text), "stop", count
                return
            if token.finish is not None:
                yield "".join(text) + stream.flush(), token.finish, count
                return
        if any(text):
            yield "".join(text), None, count


@serve.deployment(name=DEPLOYMENT)
@serve.ingress(api)
class GenerationServer:
    """One replica: the run's causal LM (fp32 or int8), its decoder, its API keys and the spec's bounds."""

    def __init__(self, replica: GenerationReplica) -> None:
        self.cfg, self.name = replica.serve, replica.name
        self.limits = self.cfg.generation or GenerationSpec()
        torch.set_num_threads(self.cfg.torch_threads)
        self.lm: LanguageModel = open_language_model(replica.model)
        self.keys = load_keys(self.cfg.auth)
        self.privacy = replica.privacy
        self.monitor: ReplicaMonitor | None = None
        if replica.monitor is not None:
            run_dir = Path(self.lm.source.run_dir)
            target = monitor_target(replica.monitor, self.cfg, self.name, run_dir, self.lm.source.int8 is not None)
            unk = self.lm.tokenizer.unk_token_id
            queue = lambda bins: CompletionQueue(bins, replica.monitor, run_dir, self.privacy, unk)  # noqa: E731
            self.monitor = ReplicaMonitor(target, queue)
        embed = replica.monitor is not None and replica.monitor.drift is not None
        self.decoder = Decoder(self.lm, self.cfg.batching.max_batch_size if self.cfg.batching else 1, embed)
        self.started = time.time()

    async def __del__(self) -> None:
        """Serve's graceful stop: what this replica counted reaches the monitor."""
        if self.monitor is not None:
            await self.monitor.last_push()

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness for load balancers; no key needed."""
        return {"status": "ok", "model": self.name, "model_version": self.lm.version}

    @api.get("/info")
    async def info(self, request: Request) -> dict:
        """Model info: run, spec hash, training metrics, card, int8 gate, limits, and what this replica generated."""
        self._authorize(request)
        return {
            "name": self.name,
            "model_version": self.lm.version,
            "family": self.lm.source.family,
            "task": "causal_lm",
            "context": self.lm.context,
            "generation": self.limits.model_dump(),
            "quantize": self.cfg.quantize,
            "int8_gate": self.lm.source.int8.to_dict() if self.lm.source.int8 else None,
            **self.lm.metadata,
            "replica": {
                "id": serve.get_replica_context().replica_id.unique_id,
                "uptime_s": time.time() - self.started,
                "running": self.decoder.running,
                "counts": dict(self.decoder.counts),
            },
        }

    @api.get("/monitor")
    async def monitor_report(self, request: Request) -> dict:
        """The deployment's monitor: current and recent windows, every check with its threshold, open alerts."""
        self._authorize(request)
        if self.monitor is None:
            raise BadRequest(404, "monitor", "this deployment is not monitored; add a monitor section to its spec")
        return await self.monitor.report()

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        """OpenAI's model list: this deployment's one model."""
        self._authorize(request)
        model = {"id": self.name, "object": "model", "created": int(self.started), "owned_by": "steward"}
        return {"object": "list", "data": [model]}

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        """Continue `prompt`; OpenAI's completions API."""
        self._authorize(request)
        body = validated(CompletionRequest, await self._payload(request))
        return await self._generate(body, self._prompt(body.prompt, "prompt"), body.max_tokens, "max_tokens", False)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        """The assistant's next message after `messages`; OpenAI's chat completions API."""
        self._authorize(request)
        body = validated(ChatRequest, await self._payload(request))
        text = self.lm.chat_prompt([(m.role, m.content) for m in body.messages])
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await self._generate(body, self._prompt(text, "messages"), asked, field, True)

    async def _generate(self, body: Any, prompt: list[int], asked: int | None, field: str, chat: bool) -> Response:
        if body.model != self.name:
            raise BadRequest(404, "model", f"no model {body.model!r} here; this server serves {self.name!r}")
        sequence = Sequence(prompt, self._sampling(body, len(prompt), asked, field))
        self.decoder.submit(sequence)
        stream, reply = TextStream(self.lm, body.stop), Reply(self.name, chat)
        if body.stream:
            with_usage = bool((body.stream_options or {}).get("include_usage"))
            events = self._events(sequence, stream, reply, len(prompt), with_usage)
            return EventStream(events, on_close=lambda: sequence.end("cancelled"))
        text, finish, count = [], "length", 0
        try:
            async for piece, end, seen in self._pieces(sequence, stream):
                text.append(piece)
                finish, count = end or finish, seen
        except GenerationFailed:
            raise BadRequest(500, "server", "generation failed on this replica; retry the request") from None
        finally:  # a client that went away cancels the handler: its request leaves the batch
            sequence.end("cancelled")
        return JSONResponse(reply.whole("".join(text), finish, usage(len(prompt), count)))

    async def _events(
        self, sequence: Sequence, stream: TextStream, reply: Reply, prompt: int, with_usage: bool
    ) -> AsyncIterator[bytes]:
        if reply.chat:  # a chat stream opens with the assistant's role
            yield reply.chunk("", first=True)
        count = 0
        try:
            async for piece, finish, seen in self._pieces(sequence, stream):
                count = seen
                if piece or finish:
                    yield reply.chunk(piece, finish)
        except GenerationFailed:
            yield event(error_body(BadRequest(500, "server", "generation failed on this replica; retry the request")))
        if with_usage:
            yield reply.usage_chunk(usage(prompt, count))
        yield DONE

    async def _pieces(self, sequence: Sequence, stream: TextStream) -> AsyncIterator[tuple[str, str | None, int]]:
        """`pieces` as serve.output_pii lets the client have them (a blocked completion finishes "content_filter");
        a finished completion is queued for the monitor."""
        guard, raw = OutputGuard(self.cfg.output_pii, self.privacy), []
        async for piece, finish, count in pieces(sequence, stream):
            raw.append(piece)
            text, blocked = guard.feed(piece, final=finish is not None)
            if blocked:
                sequence.end("content_filter")
                finish = "content_filter"
            if finish is not None and self.monitor is not None:
                generated, logprob = sequence.ids[:count], sum(sequence.logprobs[:count])
                self.monitor.record(
                    Completion(sequence.prompt, generated, logprob, finish, "".join(raw), sequence.embedding)
                )
            yield text, finish, count
            if finish is not None:
                return

    def _sampling(self, body: Any, prompt: int, asked: int | None, field: str) -> Sampling:
        """The request's sampling within serve.generation's bounds and the model's context."""
        room, context, most = self.lm.context - prompt, self.lm.context, self.limits.max_new_tokens
        if asked is not None and asked > most:
            raise BadRequest(400, field, f"{asked} is over serve.generation.max_new_tokens ({most}); ask for fewer")
        if asked is not None and asked > room:
            problem = f"the prompt's {prompt} tokens and {asked} new ones pass the model's context of {context}"
            raise BadRequest(400, field, f"{problem}; ask for at most {room}")
        bias = {int(token): value for token, value in (body.logit_bias or {}).items()}
        if unknown := [token for token in bias if token >= self.lm.vocab_size]:
            raise BadRequest(400, f"logit_bias.{unknown[0]}", f"no such token; ids are below {self.lm.vocab_size}")
        max_tokens = asked if asked is not None else min(most, room)
        return Sampling(max_tokens, body.temperature, body.top_p, body.top_k, body.seed, bias)

    def _prompt(self, text: str, field: str) -> list[int]:
        """The prompt's token ids; 400 naming `field` when it is empty or too long for serve.generation or the
        model's context (refused before tokenizing when its characters alone say so)."""
        most = min(self.limits.max_prompt_tokens, self.lm.context - 1)
        if len(text) > most * self.lm.longest_token:
            raise BadRequest(400, field, f"{len(text)} characters is more than {most} tokens; shorten it")
        ids = self.lm.encode(text)
        if not ids:
            raise BadRequest(400, field, "holds no token; send some text")
        if len(ids) > self.limits.max_prompt_tokens:
            limit = f"serve.generation.max_prompt_tokens ({self.limits.max_prompt_tokens})"
            raise BadRequest(400, field, f"{len(ids)} tokens is over {limit}; shorten it")
        if len(ids) >= self.lm.context:
            raise BadRequest(400, field, f"{len(ids)} tokens leave no room in the model's context of {self.lm.context}")
        return ids

    async def _payload(self, request: Request) -> Any:
        return parse_body(await read_body(request, self.cfg.max_body_bytes), self.cfg.max_body_bytes)

    def _authorize(self, request: Request) -> None:
        if not key_is_valid(presented_key(request.headers), self.keys):
            raise BadRequest(401, "authorization", "missing or invalid API key; send `Authorization: Bearer <key>`")


def build_generation_app(spec: JobSpec, run_dir: str, gate: GateResult | None = None) -> Application:
    """The Serve application for a causal LM `spec` serving the model in `run_dir` (`gate`: an int8 check made)."""
    cfg = spec.serve or ServeSpec()
    privacy = spec.privacy or PrivacySpec()
    replica = GenerationReplica(app_name(spec), cfg, model_source(spec, run_dir, gate), spec.monitor, privacy)
    return GenerationServer.options(**deployment_options(cfg)).bind(replica)  # type: ignore[attr-defined]
