"""Policy as code: rules an organisation sets once in a YAML file and every job spec must meet.

Rules are checked on the resolved spec as a plain dict (`JobSpec.model_dump(mode="json")`), so a rule about a
section that a given steward version does not have yet (`monitor`, `privacy`) reads it as absent rather than
failing. The policy in force is `--policy FILE`, else $STEWARD_POLICY, else `steward.policy.yaml` in the
working directory; with none of them there is no policy.

A spec is checked as every job it can become: itself, each combination of its search space's bounding values
(every grid and choice value, both ends of every range: PBT keeps mutated values inside them) and each cell of its
bench matrix, so a trial or a cell cannot do what the spec itself may not. A search space with more than
MAX_COMBINATIONS such combinations is checked one searched path at a time, which misses a rule that only two
searched values break together (GPUs = workers x GPUs per worker).

`admit` is the one check, called once before anything starts by each path that launches or emits something:
steward.pipeline (train, tune, run, bench), `steward serve`, steward.cluster.jobs.submit and `steward k8s`.
"""

import copy
import hashlib
import itertools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, ValidationError

from steward.errors import StewardError
from steward.govern.rules import CHECKS, MODEL_CARD, Violation
from steward.spec.base import Section, set_dotted
from steward.spec.document import DocumentError, read_value

if TYPE_CHECKING:
    from steward.spec import JobSpec

ENV_POLICY = "STEWARD_POLICY"
DEFAULT_FILE = "steward.policy.yaml"
MAX_COMBINATIONS = 4096


class Rules(Section):
    max_workers: int | None = Field(None, ge=1, description="Most Ray Train workers one job (or one trial) may use.")
    max_gpus: float | None = Field(None, ge=0, description="Most GPUs one job (or one trial) may use for training.")
    allowed_sources: list[str] | None = Field(
        None,
        description="data.source must start with one of these prefixes (`builtin:`, `hf:acme/`, `file:/data/ok/`); "
        "file: sources are matched after they are made absolute.",
    )
    require_governance: bool = Field(False, description="Every spec needs a governance section with owners, contact.")
    high_risk_requires: list[str] = Field(
        default_factory=list,
        description="Dotted spec paths that must be set when governance.risk is high (e.g. monitor.bias, "
        f"evaluate.fairness.thresholds), and `{MODEL_CARD}` for a complete model card.",
    )
    text_requires_pii_masking: bool = Field(
        False, description="Text data (a transformer, or a text source) needs a privacy section that masks PII."
    )
    serving_requires_auth: bool = Field(False, description="A serve section needs serve.auth (API keys).")
    max_replicas: int | None = Field(
        None, ge=1, description="Most Serve replicas: serve.num_replicas, or serve.autoscaling.max_replicas."
    )


class Policy(Section):
    name: str = Field(description="Name of the policy, shown in violations and the audit log.")
    version: str | int = Field(1, description="Version of the policy, bumped on every change.")
    description: str = Field("", description="What the policy is for and who owns it.")
    rules: Rules = Field(default_factory=Rules, description="The rules in force (unset rules are not checked).")


class PolicyViolation(StewardError):
    """A spec the policy in force does not allow; carries every violation."""

    def __init__(self, source: str, policy: "LoadedPolicy", violations: list[Violation]):
        self.violations = violations
        lines = "\n".join(f"  - {v}" for v in violations)
        super().__init__(f"{source}: {len(violations)} violation(s) of policy {policy.label}\n{lines}")


@dataclass(frozen=True)
class LoadedPolicy:
    """A validated policy, where it came from and the hash of its file (recorded with every check)."""

    policy: Policy
    path: Path
    sha256: str

    @property
    def label(self) -> str:
        return f"{self.policy.name!r} v{self.policy.version} ({self.path})"


def policy_file(option: str | Path | None = None) -> Path | None:
    """The policy in force: the option, else $STEWARD_POLICY, else ./steward.policy.yaml, else None."""
    chosen = option or os.environ.get(ENV_POLICY)
    if chosen:
        path = Path(chosen)
        if not path.is_file():
            raise StewardError(f"policy file {path} does not exist (from --policy or ${ENV_POLICY})")
        return path
    default = Path(DEFAULT_FILE)
    return default if default.is_file() else None


def load_policy(path: str | Path) -> LoadedPolicy:
    """Read and validate a policy YAML; StewardError naming every bad rule."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise StewardError(f"{path}: cannot read the policy file ({err}); give a readable UTF-8 YAML file") from None
    try:
        # The spec's limits (size, nesting, aliases): a policy file is YAML from somewhere else too.
        policy = Policy.model_validate(read_value(text) or {})
    except ValidationError as err:
        problems = "\n".join(
            f"  - {'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg'].removeprefix('Value error, ')}"
            for e in err.errors()
        )
        raise StewardError(f"{path}: not a valid policy (see cluster/policy.example.yaml)\n{problems}") from None
    except DocumentError as err:
        raise StewardError(f"{path}: {err.message}") from None
    return LoadedPolicy(policy, path.resolve(), hashlib.sha256(text.encode()).hexdigest())


# -- the rules: each takes the resolved spec as a dict and the rule's setting -------------------------------------


def in_force(policy: Policy) -> dict[str, Any]:
    """The rules the policy sets (name -> setting), leaving out unset and switched-off ones."""
    settings = policy.rules.model_dump()
    return {name: value for name, value in settings.items() if value not in (None, False, [])}


def check(spec: dict[str, Any], policy: Policy) -> list[Violation]:
    """Every violation of `policy` by the resolved spec dict, in rule order."""
    return [v for name, setting in in_force(policy).items() for v in CHECKS[name](spec, setting)]


def variants(spec: "JobSpec") -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, {dotted path: value}) for every job the spec can become: search-space combinations, bench cells."""
    if spec.tune is not None:
        space = {path: dist.candidates for path, dist in spec.tune.search_space.items()}
        if math.prod(map(len, space.values())) <= MAX_COMBINATIONS:
            for values in itertools.product(*space.values()):
                yield "tune.search_space", dict(zip(space, values, strict=True))
        else:
            yield from (("tune.search_space", {path: v}) for path, values in space.items() for v in values)
    if spec.bench is not None:
        where = "bench.cells" if spec.bench.cells else "bench.matrix"
        yield from ((where, cell) for cell in spec.bench.combinations())


def _with(spec: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    variant = copy.deepcopy(spec)
    for path, value in values.items():
        set_dotted(variant, path, value)
    return variant


def check_job(spec: "JobSpec", policy: Policy) -> list[Violation]:
    """Every violation by the spec and by each job it can become; a variant's names the values that break it."""
    base = spec.model_dump(mode="json")
    found = check(base, policy)
    inherited, seen = {(v.rule, v.field, v.message) for v in found}, set()
    for where, values in variants(spec):
        for v in check(_with(base, values), policy):
            field = f"{where}.{v.field}" if v.field in values else where
            if (v.rule, v.field, v.message) in inherited or (v.rule, field) in seen:
                continue  # the spec itself breaks it, or a variant already named it
            seen.add((v.rule, field))
            alone = {v.field: values[v.field]} if v.field in values else {}
            named = alone if alone and v in check(_with(base, alone), policy) else values
            shown = ", ".join(f"{path}={value!r}" for path, value in named.items())
            found.append(Violation(v.rule, field, f"with {shown}: {v.message}", f"keep {where} within it: {v.fix}"))
    return found


def explain(policy: Policy) -> list[tuple[str, Any, str]]:
    """(rule, setting, what it means) for every rule in force."""
    fields = Rules.model_fields
    return [(name, value, fields[name].description or "") for name, value in in_force(policy).items()]


@dataclass(frozen=True)
class Admission:
    """Who asks for a spec to be admitted: the action, the spec's file, and the --policy option (None: the policy
    in force from $STEWARD_POLICY or ./steward.policy.yaml)."""

    action: str
    source: str
    option: str | Path | None = None

    def admit(self, spec: "JobSpec") -> "LoadedPolicy | None":
        return admit(spec, self.option, self.action, self.source)


def admit(spec: "JobSpec", option: str | Path | None, action: str, source: str) -> LoadedPolicy | None:
    """Check `spec` (and every job it can become) against the policy in force before `action` (validate, train,
    tune, run, bench, serve, submit, k8s) starts.

    Records `policy.violation` (and raises PolicyViolation, a StewardError: exit 2) or `spec.validated` in the
    audit log under the spec's output_dir. Returns the policy in force, or None when there is none.
    """
    from steward.govern import audit
    from steward.runs import spec_hash

    path = policy_file(option)
    loaded = load_policy(path) if path else None
    violations = check_job(spec, loaded.policy) if loaded else []
    fields: dict[str, Any] = {"action": action, "spec": source, "job": spec.name, "spec_hash": spec_hash(spec)}
    if loaded:
        fields |= {
            "policy": loaded.policy.name,
            "policy_version": loaded.policy.version,
            "policy_sha256": loaded.sha256,
        }
    log = audit.log_path(spec.output_dir)
    if violations and loaded:
        audit.record("policy.violation", log=log, **fields, violations=[v.to_dict() for v in violations])
        raise PolicyViolation(source, loaded, violations)
    audit.record("spec.validated", log=log, **fields)
    return loaded
