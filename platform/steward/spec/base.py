"""The strict base every spec section inherits, and how sections report several problems at once."""

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, WithJsonSchema
from pydantic_core import InitErrorDetails, PydanticCustomError


class Section(BaseModel):
    """A spec section: no unknown keys, immutable once validated, finite numbers only.

    Infinity and NaN have no JSON form (the resolved spec is written as JSON and YAML) and no consumer of a
    spec field (torch, Ray, DeepSpeed) takes them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


# The largest seed every consumer takes: numpy's legacy RandomState and Optuna's samplers want 32 bits.
MAX_SEED = 2**32 - 1
# Counts of steps, epochs, records or seconds: far beyond any run, within a C int (Ray, DeepSpeed, torch).
MAX_COUNT = 2**31 - 1


# `\d+(\.\d*)?` rather than `\d+\.?\d*`: the latter backtracks quadratically on a long run of digits.
def _label_text(value: object) -> object:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


# A class label or group value: compared as text everywhere, written as text or as an integer (YAML reads `1` as an
# int). The JSON schema says both, so an editor accepts what `steward validate` accepts.
Label = Annotated[
    str, BeforeValidator(_label_text), WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "integer"}]})
]

_EXPONENT_FLOAT = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+$")


def coerce_exponent(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads `3e-4` as a string; people mean the float."""
    if isinstance(value, str) and _EXPONENT_FLOAT.match(value):
        return float(value)
    return value


def shorten(text: str, limit: int = 200) -> str:
    """Text cut to `limit` characters for an error message: a hostile value must not flood the terminal."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


# Mappings whose keys are dotted paths themselves: `tune.search_space.train.optimizer.lr` is one key of search_space.
PATH_KEYED = ("tune.search_space.",)


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """Set raw["a"]["b"]["c"] = value for key "a.b.c", creating mappings on the way."""
    node = raw
    prefix = next((p for p in PATH_KEYED if key.startswith(p)), "")
    parts = [*prefix.split(".")[:-1], key[len(prefix) :]] if prefix else key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def raise_problems(section: BaseModel, problems: dict[str, str] | dict[str | tuple, str]) -> None:
    """Raise one ValidationError holding every cross-field problem, each at its own field location.

    A key is a dotted path, or a tuple when a part itself holds dots (a search-space path).
    """
    if not problems:
        return
    errors = [
        InitErrorDetails(
            type=PydanticCustomError("conflict", message),
            loc=key if isinstance(key, tuple) else tuple(key.split(".")),
            input=None if isinstance(key, tuple) else _lookup(section, key),
        )
        for key, message in problems.items()
    ]
    raise ValidationError.from_exception_data(type(section).__name__, errors)


def _lookup(section: BaseModel, path: str) -> object:
    value: object = section
    for part in path.split("."):
        value = getattr(value, part, None)
    return value
