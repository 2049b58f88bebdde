"""The rules a policy can set, each a check of the resolved spec dict: what it breaks, where, and the fix.

A rule reads the spec as a plain dict (`JobSpec.model_dump(mode="json")`), so a section a given steward version does
not have yet reads as absent. steward.govern.policy loads policies and decides which rules are in force.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from steward.spec.governance import CARD_FIELDS

MODEL_CARD = "model_card"  # in high_risk_requires: every governance card field filled in


@dataclass(frozen=True)
class Violation:
    """One broken rule: which rule, which spec field, what is wrong and how to fix it."""

    rule: str
    field: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"policy rule `{self.rule}`: {self.field}: {self.message}; fix: {self.fix}"

    def to_dict(self) -> dict[str, str]:
        return {"rule": self.rule, "field": self.field, "message": self.message, "fix": self.fix}


def lookup(spec: dict[str, Any], path: str) -> Any:
    """The value at a dotted path of the spec dict, or None when any part is absent (or a section is unset)."""
    node: Any = spec
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def is_set(value: Any) -> bool:
    """Set means present and not empty, and not explicitly switched off (`enabled: false`)."""
    if isinstance(value, dict) and value.get("enabled") is False:
        return False
    return value is not None and value != {} and value != [] and value != ""


def check_max_workers(spec: dict[str, Any], limit: int) -> list[Violation]:
    workers = lookup(spec, "distributed.num_workers") or 1
    if workers <= limit:
        return []
    return [
        Violation(
            "max_workers",
            "distributed.num_workers",
            f"{workers} workers is over the limit of {limit}",
            f"set distributed.num_workers to {limit} or fewer",
        )
    ]


def check_max_gpus(spec: dict[str, Any], limit: float) -> list[Violation]:
    dist = spec.get("distributed") or {}
    gpus = dist.get("num_workers", 1) * dist.get("gpus_per_worker", 1.0) if dist.get("use_gpu") else 0.0
    if gpus <= limit:
        return []
    return [
        Violation(
            "max_gpus",
            "distributed.gpus_per_worker",
            f"{gpus:g} GPUs is over the limit of {limit:g}",
            "lower distributed.num_workers or gpus_per_worker, or train on CPU (use_gpu: false)",
        )
    ]


def check_allowed_sources(spec: dict[str, Any], prefixes: list[str]) -> list[Violation]:
    source = lookup(spec, "data.source") or ""
    if any(source.startswith(p) for p in prefixes):
        return []
    return [
        Violation(
            "allowed_sources",
            "data.source",
            f"{source!r} is not from an approved source",
            f"use data that starts with one of: {', '.join(prefixes)}",
        )
    ]


def check_require_governance(spec: dict[str, Any], on: bool) -> list[Violation]:
    gov = spec.get("governance")
    if not on or (gov and gov.get("owners") and gov.get("contact")):
        return []
    return [
        Violation(
            "require_governance",
            "governance",
            "every job needs named owners and a contact",
            "add `governance: {owners: [...], contact: ..., risk: low|medium|high}`",
        )
    ]


def check_high_risk(spec: dict[str, Any], required: list[str]) -> list[Violation]:
    if lookup(spec, "governance.risk") != "high":
        return []
    found = []
    for path in required:
        if path == MODEL_CARD:
            missing = [f for f in CARD_FIELDS if not is_set(lookup(spec, f"governance.{f}"))]
            if missing:
                found.append(
                    Violation(
                        "high_risk_requires",
                        "governance",
                        f"a high-risk model needs a complete model card; empty: {', '.join(missing)}",
                        "fill in those governance fields",
                    )
                )
        elif not is_set(lookup(spec, path)):
            found.append(
                Violation(
                    "high_risk_requires",
                    path,
                    "required when governance.risk is high",
                    f"configure {path} (see `steward schema`), or lower the risk with a reason",
                )
            )
    return found


def is_text(spec: dict[str, Any]) -> bool:
    """Text data: a transformer reads token ids, and the synthetic text source is text."""
    return lookup(spec, "model.family") == "transformer" or lookup(spec, "data.source") == "builtin:synthetic-text"


def check_pii_masking(spec: dict[str, Any], on: bool) -> list[Violation]:
    if not on or not is_text(spec) or is_set(spec.get("privacy")):
        return []
    return [
        Violation(
            "text_requires_pii_masking",
            "privacy",
            "text training data must have PII masked",
            "add a privacy section that masks PII in the text column",
        )
    ]


def check_serving_auth(spec: dict[str, Any], on: bool) -> list[Violation]:
    if not on or spec.get("serve") is None or is_set(lookup(spec, "serve.auth")):
        return []
    return [
        Violation(
            "serving_requires_auth",
            "serve.auth",
            "a served model must require API keys",
            "add `serve.auth: {api_keys_env: STEWARD_API_KEYS}` (or api_keys_file)",
        )
    ]


def check_max_replicas(spec: dict[str, Any], limit: int) -> list[Violation]:
    replicas = lookup(spec, "serve.autoscaling.max_replicas") or lookup(spec, "serve.num_replicas") or 1
    if spec.get("serve") is None or replicas <= limit:
        return []
    field = "serve.autoscaling.max_replicas" if lookup(spec, "serve.autoscaling") else "serve.num_replicas"
    return [
        Violation(
            "max_replicas",
            field,
            f"{replicas} replicas is over the limit of {limit}",
            f"set {field} to {limit} or fewer",
        )
    ]


CHECKS: dict[str, Callable[[dict[str, Any], Any], list[Violation]]] = {
    "max_workers": check_max_workers,
    "max_gpus": check_max_gpus,
    "allowed_sources": check_allowed_sources,
    "require_governance": check_require_governance,
    "high_risk_requires": check_high_risk,
    "text_requires_pii_masking": check_pii_masking,
    "serving_requires_auth": check_serving_auth,
    "max_replicas": check_max_replicas,
}
