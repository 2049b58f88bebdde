"""POST /explain on a replica: Integrated Gradients of a request's instances, within the spec's caps.

Caps (explain.max_instances, explain.max_steps) are checked before any work, because one IG request costs
about n_steps forward and backward passes per instance: uncapped, a client could pin the replica.
"""

import functools
from pathlib import Path
from typing import Any

from pydantic import Field
from torch import nn

from steward.data import DataError
from steward.explain.explainer import explain_instances
from steward.serve.model import NON_FINITE, ServedModel, non_finite_row
from steward.serve.protocol import BadRequest, Strict, validated
from steward.spec.explain import ExplainSpec, baseline_problem


class ExplainRequest(Strict):
    instances: list[Any] = Field(min_length=1, description="Raw inputs, as for /predict.")
    target: str | None = Field(None, description="Class label to explain (default: each instance's prediction).")
    n_steps: int | None = Field(None, ge=2, description="Integration steps (default explain.n_steps).")


@functools.lru_cache(maxsize=2)
def _fp32_model(run_dir: str) -> nn.Module:
    from steward.evaluate.run import load_servable

    return load_servable(Path(run_dir) / "model")[0]


def explained_model(served: ServedModel) -> nn.Module:
    """The fp32 model: int8 dynamic quantization has no gradients, so an int8 replica explains its fp32 original."""
    return served.model if served.gate is None else _fp32_model(str(served.run_dir))


def explain_request(served: ServedModel, cfg: ExplainSpec | None, payload: Any) -> dict[str, Any]:
    """The /explain reply for a parsed JSON body under the explain section `cfg` (its defaults without one);
    BadRequest (4xx naming the field and the cap) when refused."""
    cfg = cfg or ExplainSpec()
    body = validated(ExplainRequest, payload)
    if len(body.instances) > cfg.max_instances:
        count, cap = len(body.instances), cfg.max_instances
        raise BadRequest(413, "instances", f"{count} instances is over the limit of {cap} (explain.max_instances)")
    steps = body.n_steps or cfg.n_steps
    if steps > cfg.max_steps:
        raise BadRequest(422, "n_steps", f"{steps} is over the limit of {cfg.max_steps} (explain.max_steps)")
    # the same checks, and the same 422s, as /predict: an instance that overflows the model has no explanation
    (output,) = served.run([served.prepare(body.instances, "instances")])
    if (row := non_finite_row(output)) is not None:
        raise BadRequest(422, f"instances[{row}]", NON_FINITE)
    labels = served.info.label_names
    if body.target is not None and body.target not in labels:
        raise BadRequest(422, "target", f"{body.target!r} is not a label of this model; labels are {labels[:20]}")
    problem = baseline_problem(cfg.baseline, served.source.family, served.info.modality)
    if problem:
        raise BadRequest(422, "explain.baseline", problem)
    try:
        records, baseline = explain_instances(
            explained_model(served),
            served.info,
            cfg,
            body.instances,
            served.source.max_length,
            target=body.target,
            n_steps=steps,
        )
    except DataError as err:
        where, message = err.problems[0]
        raise BadRequest(422, where, message) from None
    return {
        "model_version": served.version,
        "method": "integrated_gradients",
        "baseline": baseline,
        "n_steps": steps,
        "output": cfg.output,
        "explanations": records,
    }
