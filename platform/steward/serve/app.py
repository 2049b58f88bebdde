"""spec + run folder -> a Ray Serve application: one FastAPI ingress deployment with `@serve.batch`.

Routes (under serve.route_prefix): POST /predict (steward's JSON), the Open Inference Protocol (KServe v2)
routes under /v2, GET /healthz and GET /info. Every refused request is a 4xx JSON body naming the field.

The application is built (`build_app`) where the spec is: a replica gets a `ReplicaConfig`, the sections it needs
as plain data, and never the job spec.
"""

import asyncio
import logging
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from steward import __version__
from steward.serve.arms import Arm
from steward.serve.auth import key_is_valid, load_keys, presented_key
from steward.serve.generate_app import build_generation_app
from steward.serve.model import (
    NON_FINITE,
    Output,
    ServedModel,
    non_finite_row,
    predict_response,
)
from steward.serve.monitoring import ReplicaMonitor
from steward.serve.oip_binary import EXTENSIONS, HEADER, binary_outputs, oip_reply, read_request
from steward.serve.options import DEPLOYMENT, deployment_options
from steward.serve.protocol import (
    BadRequest,
    FeedbackRequest,
    InferResponse,
    ModelMetadata,
    PredictRequest,
    PredictResponse,
    TensorMetadata,
    check_attributes,
    json_response,
    oip_instances,
    oip_outputs,
    parse_body,
    read_body,
    requested_outputs,
    validated,
)
from steward.serve.quantize import GateResult
from steward.serve.registry import served_version
from steward.serve.replica import ReplicaConfig, open_arms, replica_config
from steward.serve.rollout import Challenger
from steward.serve.source import find_run
from steward.serve.timing import Timing
from steward.spec import JobSpec

logger = logging.getLogger("steward.serve")
FEEDBACK_BYTES = 4096  # a label's body: a request id and a class name
# The schema is served by a route of the replica's own, behind the API key like everything but the health checks.
api = FastAPI(title="steward model server", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(BadRequest)
async def _refused(request: Request, err: BadRequest) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@api.exception_handler(StarletteHTTPException)
async def _no_route(request: Request, err: StarletteHTTPException) -> JSONResponse:
    # Starlette's own refusals (no route at this path, a method the route does not take) are shaped like ours
    part = "method" if err.status_code == 405 else "path"
    refusal = BadRequest(err.status_code, part, f"{err.detail} ({request.method} {request.url.path})")
    return JSONResponse(refusal.body(), status_code=err.status_code, headers=err.headers)


@api.exception_handler(Exception)
async def _failed(request: Request, err: Exception) -> JSONResponse:
    # A bug must not take the replica down or leak a traceback to the client; the log keeps the detail.
    logger.exception("unexpected error on %s", request.url.path)
    return JSONResponse({"error": f"internal error ({type(err).__name__})", "field": None}, status_code=500)


# Helpers the replica calls are defined above the class: Serve serializes the class when it is decorated.
@serve.deployment(name=DEPLOYMENT)
@serve.ingress(api)
class ModelServer:
    """One replica: the run's model (fp32 or int8), its API keys, and batching as the spec sets them."""

    def __init__(self, replica: ReplicaConfig) -> None:
        self.cfg, self.name, self.explain_cfg = replica.serve, replica.name, replica.explain
        torch.set_num_threads(self.cfg.torch_threads)
        self.arms = open_arms(replica)
        self.served: ServedModel = self.arms.champion.served  # the endpoint's metadata is the champion's
        self.monitor = self.arms.champion.monitor
        self.keys = load_keys(self.cfg.auth)
        self.batch_sizes: Counter[int] = Counter()
        # An autoscaled replica runs forward passes off the event loop, one at a time, so that requests waiting for
        # one are in flight here: under Serve's HAProxy ingress the replicas' in-flight counts are all the autoscaler
        # sees (HAProxy's own queue is not), and a pass on the loop would keep every other request outside.
        self.forward_thread = ThreadPoolExecutor(1) if self.cfg.autoscaling is not None else None
        self.started = time.time()
        if self.cfg.batching is not None:
            self._run_batch.set_max_batch_size(self.cfg.batching.max_batch_size)  # type: ignore[attr-defined]
            wait_s = self.cfg.batching.batch_wait_timeout_ms / 1000
            self._run_batch.set_batch_wait_timeout_s(wait_s)  # type: ignore[attr-defined]

    async def __del__(self) -> None:
        """Serve's graceful stop (scale-down, redeploy, delete): what this replica counted reaches the monitor."""
        for arm in self.arms.all if hasattr(self, "arms") else []:  # not if __init__ failed
            if arm.monitor is not None:
                await arm.monitor.last_push()

    # -- health and metadata -------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness for load balancers; no key needed."""
        return {"status": "ok", "model": self.name, "model_version": self.served.version}

    @api.get("/v2/health/live")
    async def live(self) -> dict:
        return {"live": True}

    @api.get("/v2/health/ready")
    async def ready(self) -> dict:
        return {"ready": True}

    @api.get("/v2/models/{name}/ready")
    async def model_ready(self, name: str) -> dict:
        self._check_name(name)
        return {"name": name, "ready": True}

    @api.get("/info")
    async def info(self, request: Request) -> dict:
        """Model info: run id, spec hash, training metrics, model card, int8 gate and batching seen here."""
        self._authorize(request)
        info = self.served.info
        return {
            "name": self.name,
            "model_version": self.served.version,
            "family": self.served.source.family,
            "modality": info.modality,
            "input_shape": list(info.input_shape),
            "labels": info.label_names,
            "quantize": self.cfg.quantize,
            "int8_gate": self.served.gate.to_dict() if self.served.gate else None,
            **self.served.metadata,
            "replica": {
                "id": serve.get_replica_context().replica_id.unique_id,
                "uptime_s": time.time() - self.started,
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "labels_refused": dict(self.monitor.refused_labels) if self.monitor else {},
            },
            "rollout": self._rollout_info(),
        }

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> dict:
        """The API's OpenAPI schema (for clients and fuzzers)."""
        self._authorize(request)
        return api.openapi()

    @api.get("/v2")
    async def server_metadata(self, request: Request) -> dict:
        """OIP server metadata."""
        self._authorize(request)
        return {"name": "steward", "version": __version__, "extensions": list(EXTENSIONS)}

    @api.get("/v2/models/{name}")
    async def metadata(self, name: str, request: Request) -> ModelMetadata:
        """OIP model metadata: the input tensor's datatype and shape, and the three output tensors."""
        self._authorize(request)
        self._check_name(name)
        info, classes = self.served.info, len(self.served.info.label_names)
        text = info.modality == "text"
        tensor = TensorMetadata(
            name="input", datatype="BYTES" if text else "FP32", shape=[-1] if text else [-1, *info.input_shape]
        )
        return ModelMetadata(
            name=self.name,
            versions=[self.served.version],
            inputs=[tensor],
            outputs=[
                TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, classes]),
                TensorMetadata(name="class_id", datatype="INT64", shape=[-1]),
                TensorMetadata(name="label", datatype="BYTES", shape=[-1]),
            ],
        )

    # -- inference -----------------------------------------------------------------------------------------
    @api.post("/predict", response_model=PredictResponse)
    async def predict(self, request: Request) -> Response:
        """steward's JSON: {"instances": [...], "attributes": {...}} -> one prediction per instance."""
        timing = Timing()
        self._authorize(request)
        body = validated(PredictRequest, parse_body(await self._body(request), self.cfg.max_body_bytes))
        self._check_count(len(body.instances), "instances")
        check_attributes(body.attributes)
        timing.mark("parse")
        arm = self.arms.pick(request.headers)
        output = await self._probabilities(arm, body.instances, "instances", timing)
        # Per-group decision thresholds (train.mitigation), if the run has them: the reply and the monitor see them.
        output = replace(output, probabilities=arm.served.decide(output.probabilities, body.attributes))
        request_ids = arm.request_ids(len(body.instances))
        response = json_response(predict_response(arm.served, self.name, output.probabilities, request_ids))
        timing.mark("reply")
        self._monitor(arm, output, body.instances, "instances", body.attributes, request_ids, timing)
        response.headers["Server-Timing"] = timing.header()
        return response

    @api.post("/v2/models/{name}/infer", response_model=InferResponse)
    async def infer(self, name: str, request: Request) -> Response:
        """OIP inference: one input tensor (BYTES [N] for text, FP32 [N, *shape] otherwise), three outputs; tensors
        in JSON or as binary data after it (the binary tensor data extension), both ways."""
        timing = Timing()
        self._authorize(request)
        self._check_name(name)
        raw = await self._body(request)
        body, data = read_request(raw, request.headers.get(HEADER), self.cfg.max_body_bytes)
        if body.model_name not in (None, name):
            raise BadRequest(422, "model_name", f"{body.model_name!r} is not the model of the path, {name!r}")
        names = requested_outputs(body)
        binary = binary_outputs(body, names)
        info = self.served.info
        instances = oip_instances(body, info.modality, info.input_shape, data[0])
        self._check_count(len(instances), "inputs[0].shape")
        timing.mark("parse")
        arm = self.arms.pick(request.headers)
        output = await self._probabilities(arm, instances, "inputs[0].data", timing)
        # Late labels name a prediction by an id this server issued (parameters.request_ids, one per instance),
        # never by the client's `id`, which another client may also use.
        request_ids = arm.request_ids(len(instances))
        reply = InferResponse(
            model_name=self.name,
            model_version=arm.served.version,
            id=body.id or uuid.uuid4().hex,
            parameters={"request_ids": request_ids},
            outputs=oip_outputs(output.probabilities, info.label_names, names),
        )
        response = oip_reply(reply, binary)
        timing.mark("reply")
        self._monitor(arm, output, instances, "inputs[0].data", {}, request_ids, timing)
        response.headers["Server-Timing"] = timing.header()
        return response

    @api.post("/explain")
    async def explain(self, request: Request) -> JSONResponse:
        """Integrated Gradients per instance, as `steward explain`; explain.max_* cap instances and steps."""
        from steward.serve.explain import explain_request  # here: captum loads only on replicas that explain

        self._authorize(request)
        payload = parse_body(await self._body(request), self.cfg.max_body_bytes)
        # Off the event loop: IG runs n_steps forward and backward passes, and other requests must keep flowing.
        return JSONResponse(await asyncio.to_thread(explain_request, self.served, self.explain_cfg, payload))

    # -- monitoring ----------------------------------------------------------------------------------------
    @api.get("/monitor")
    async def monitor_report(self, request: Request) -> dict:
        """The deployment's monitor: current and recent windows, every check with its threshold, open alerts."""
        self._authorize(request)
        report = await self._monitoring().report()
        if self.arms.challenger is not None and self.arms.challenger.monitor is not None:
            report["arm"] = "champion"  # the challenger's beside it, judged against its own reference
            report["arms"] = {"challenger": await self.arms.challenger.monitor.report()}
            report["rollout"] = await self.arms.actor.status.remote()  # type: ignore[union-attr]
        return report

    @api.post("/feedback")
    async def feedback(self, request: Request) -> dict:
        """A label that arrived later for an earlier prediction, by the request_id this server issued; one label a
        prediction. "status" is "matched" (counted now) or "waiting" (for a replica still holding the prediction)."""
        self._authorize(request)
        monitor = self._monitoring()
        monitor.admit_label()
        try:
            body = validated(FeedbackRequest, parse_body(await self._body(request, FEEDBACK_BYTES), FEEDBACK_BYTES))
        except BadRequest as err:
            raise monitor.refuse("malformed", err) from None
        if body.label not in self.served.info.label_names:
            problem = f"unknown class {body.label!r}; one of {self.served.info.label_names}"
            raise monitor.refuse("label", BadRequest(422, "label", problem))
        status = await self.arms.feedback(body.request_id, body.label)
        return {"request_id": body.request_id, "status": status, "matched": status == "matched"}

    def _monitoring(self) -> ReplicaMonitor:
        if self.monitor is None:
            raise BadRequest(404, "monitor", "this deployment is not monitored; add a monitor section to its spec")
        return self.monitor

    def _rollout_info(self) -> dict | None:
        if self.arms.challenger is None:
            return None
        routing = self.arms.routing
        version = self.arms.challenger.served.version
        return {"mode": routing.mode, "state": routing.state, "share": routing.share, "challenger": version}

    def _monitor(
        self, arm: Arm, output: Output, instances: Any, field: str, attributes: dict, ids: list[str], timing: Timing
    ) -> None:
        if arm.monitor is not None:  # only queued here (cheaper than scheduling a callback): counted at push
            arm.monitor.record(output, attributes, ids)
            timing.mark("monitor")
        if arm is self.arms.champion:
            self.arms.shadow(instances, field, attributes, ids, output)

    async def _probabilities(self, arm: Arm, instances: Any, field: str, timing: Timing) -> Output:
        prepared = arm.served.prepare(instances, field)  # bad input fails here, alone, before any batch
        timing.mark("prepare")
        try:
            output = await self._forward(arm, prepared)
        except Exception:  # the model's failure, not the client's: counted against its arm
            arm.failed()
            raise
        timing.mark("wait")
        timing.split("wait", encode=output.encode_s, forward=output.forward_s)
        if (row := non_finite_row(output)) is not None:  # neither the client nor the monitor gets NaN
            if arm.monitor is not None:
                arm.monitor.refused(len(output.probabilities))
            raise BadRequest(422, f"{field}[{row}]", NON_FINITE)
        arm.answered(output)
        return output

    async def _forward(self, arm: Arm, prepared: Any) -> Output:
        monitored = arm.monitor is not None
        if self.cfg.batching is not None:
            return await self._run_batch((arm, prepared))
        self.batch_sizes[1] += 1
        if self.forward_thread is None:  # on the event loop: the lowest latency for one small forward pass
            return arm.served.run([prepared], monitored)[0]
        loop = asyncio.get_running_loop()
        return (await loop.run_in_executor(self.forward_thread, arm.served.run, [prepared], monitored))[0]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _run_batch(self, requests: list[tuple[Arm, Any]]) -> list[Output]:
        """One forward pass per arm over every request Serve grouped; each gets its own rows back.

        The pass runs in a worker thread (torch releases the GIL) so the event loop keeps reading and parsing
        the next requests meanwhile: in Serve's throughput mode user code shares the loop with HTTP.
        """
        self.batch_sizes[len(requests)] += 1
        return await asyncio.to_thread(self.arms.run, requests)

    # -- request checks ------------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if not key_is_valid(presented_key(request.headers), self.keys):
            raise BadRequest(401, "authorization", "missing or invalid API key; send `Authorization: Bearer <key>`")

    def _check_name(self, name: str) -> None:
        if name != self.name:
            raise BadRequest(404, "name", f"no model {name!r} here; this server serves {self.name!r}")

    def _check_count(self, count: int, field: str) -> None:
        if count == 0:  # nothing to predict, and an empty batch is no shape the model and its checks take
            raise BadRequest(422, field, "holds no instance; send at least one")
        if count > self.cfg.max_instances:
            limit = f"the limit of {self.cfg.max_instances} per request (serve.max_instances)"
            raise BadRequest(413, field, f"{count} instances is over {limit}; split the request")

    async def _body(self, request: Request, limit: int | None = None) -> bytes:
        """The body, refused as soon as it passes `limit` (serve.max_body_bytes by default), before it is all read."""
        what = "serve.max_body_bytes" if limit is None else request.url.path.rsplit("/", 1)[-1]
        return await read_body(request, limit or self.cfg.max_body_bytes, what)


def build_app(
    spec: JobSpec, run_dir: str, gate: GateResult | None = None, challenger: Challenger | None = None
) -> Application:
    """The Serve application for `spec` serving the model in `run_dir` (`gate`: an int8 check already made;
    `challenger`: a rollout's, beside it); a causal LM's is the generation application (steward.serve.generate_app)."""
    if spec.model.task == "causal_lm":
        return build_generation_app(spec, run_dir, gate)
    replica = replica_config(spec, run_dir, gate, challenger)
    deployment = ModelServer.options(**deployment_options(replica.serve))  # type: ignore[attr-defined]
    return deployment.bind(replica)


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for Serve config files (`import_path: steward.serve.app:app_builder`, args: spec, and run_dir or
    model).

    Deployment options come from the spec here; a config file's `deployments:` entries override them. `model`
    (models:/NAME@ALIAS) serves a registered version, fetched into output_dir; without run_dir or model (a
    RayService made by `steward k8s`), the newest succeeded run under the spec's output_dir is served.
    """
    spec = JobSpec.model_validate(args["spec"])
    if args.get("model"):
        return build_app(spec, str(served_version(spec, args["model"])))
    return build_app(spec, args.get("run_dir") or str(find_run(spec)))
