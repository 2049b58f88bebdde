"""The job spec: pydantic models of every section, and the YAML loader."""

from steward.spec.job import JobSpec
from steward.spec.load import Problem, SpecError, load_job, validate_job

__all__ = ["JobSpec", "Problem", "SpecError", "load_job", "validate_job"]
