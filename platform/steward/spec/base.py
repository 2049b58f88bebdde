"""The strict base every spec section inherits, and how sections report several problems at once."""

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError


class Section(BaseModel):
    """A spec section: no unknown keys, immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def raise_problems(section: BaseModel, problems: dict[str, str]) -> None:
    """Raise one ValidationError holding every cross-field problem, each at its own dotted field path."""
    if not problems:
        return
    errors = [
        InitErrorDetails(
            type=PydanticCustomError("conflict", message),
            loc=tuple(path.split(".")),
            input=_lookup(section, path),
        )
        for path, message in problems.items()
    ]
    raise ValidationError.from_exception_data(type(section).__name__, errors)


def _lookup(section: BaseModel, path: str) -> object:
    value: object = section
    for part in path.split("."):
        value = getattr(value, part, None)
    return value
