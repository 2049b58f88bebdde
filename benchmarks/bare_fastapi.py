"""The baseline of benchmarks/serve_overhead.py: steward's /predict handler on a bare FastAPI app under uvicorn.

    python benchmarks/bare_fastapi.py RUN_DIR PORT

Same model loading (`load_served_model`), same body parsing, validation, encoding, forward pass and response as
the Serve deployment (`steward.serve.app`), without Ray Serve: no proxy, no replica scheduling, no batching.
"""

import sys
import uuid
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request, Response

from steward.runs import read_spec
from steward.serve.model import load_served_model, predict_response
from steward.serve.protocol import PredictRequest, PredictResponse, json_response, parse_body, validated


def build(run_dir: Path) -> FastAPI:
    spec = read_spec(run_dir)
    served = load_served_model(spec, run_dir)
    app = FastAPI()

    @app.post("/predict", response_model=PredictResponse)
    async def predict(request: Request) -> Response:
        body = validated(PredictRequest, parse_body(await request.body(), 4_000_000))
        ids = [uuid.uuid4().hex for _ in body.instances]  # as an unmonitored replica issues them
        return json_response(predict_response(served, spec.name, served.probabilities(body.instances), ids))

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    return app


if __name__ == "__main__":
    torch.set_num_threads(1)  # as a steward replica (serve.torch_threads: 1)
    uvicorn.run(build(Path(sys.argv[1])), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
