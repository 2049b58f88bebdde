"""YAML -> JobSpec: safe_load, dotted overrides, validation, and errors a person can act on."""

import difflib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from steward.errors import StewardError
from steward.spec.base import coerce_exponent, set_dotted, shorten
from steward.spec.document import DocumentError, read_document, read_value
from steward.spec.job import JobSpec


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec: where it is and what to do about it."""

    path: str
    message: str
    line: int | None = None
    value: Any = None

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line else "--set" if self.line == 0 else "spec"
        shown = "" if self.value is None else f" (got {shorten(repr(self.value))})"
        return f"{self.path or '<root>'} [{where}]: {self.message}{shown}"


class SpecError(StewardError):
    """A spec that cannot run; carries every problem found, not only the first."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source, self.problems = source, problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # A trial validates its spec in a Ray worker; the default reduce would pass only the joined message.
        return (type(self), (self.source, self.problems))


def load_job(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Read a YAML job spec, apply `a.b.c=value` overrides and validate it; raise SpecError listing every problem."""
    path = Path(path)
    try:
        raw, lines = read_document(path)
    except DocumentError as err:
        raise SpecError(str(path), [Problem("", err.message, err.line)]) from None
    if not isinstance(raw, dict):
        raise SpecError(str(path), [Problem("", "a job spec is a YAML mapping with at least name, data and model")])
    overridden = set()
    for item in overrides:
        key, value = _parse_override(str(path), item)
        set_dotted(raw, key, value)
        overridden.add(key)
    return validate_job(raw, str(path), path.resolve().parent, lines, overridden)


def validate_job(
    raw: dict, source: str, base_dir: Path, lines: dict | None = None, overridden: set | None = None
) -> JobSpec:
    """Validate a spec mapping and resolve its input paths against base_dir."""
    lines, overridden = lines or {}, overridden or set()
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(source, [_problem(e, lines, overridden) for e in err.errors()]) from None
    return resolve_paths(spec, base_dir, source)


def resolve_paths(spec: JobSpec, base_dir: Path, source: str = "spec") -> JobSpec:
    """Make file: sources and pretrained paths absolute; inputs that do not exist are errors now, not mid-run."""
    problems, data, model = [], spec.data, spec.model
    if data.scheme == "file":
        found = _input_path(data.location, base_dir)
        if found is None:
            problems.append(Problem("data.source", f"file {data.location!r} does not exist (relative to {base_dir})"))
        else:
            data = data.model_copy(update={"source": f"file:{found}"})
    pretrained = getattr(model.params, "pretrained", None)
    if pretrained:
        found = _pretrained_path(pretrained, base_dir)
        if found is None:
            problems.append(
                Problem(
                    "model.params.pretrained",
                    f"{pretrained!r} is neither an existing folder nor an installed package path",
                )
            )
        else:
            params = model.params.model_copy(update={"pretrained": found})
            model = model.model_copy(update={"params": params})
    if problems:
        raise SpecError(source, problems)
    serve, privacy = _resolve_keys_file(spec, base_dir), _resolve_hash_key_file(spec, base_dir)
    return spec.model_copy(update={"data": data, "model": model, "serve": serve, "privacy": privacy})


def _resolve_hash_key_file(spec: JobSpec, base_dir: Path) -> Any:
    """privacy.hash_key_file made absolute against the spec folder; read (and checked) when the data is loaded."""
    if spec.privacy is None or spec.privacy.hash_key_file is None:
        return spec.privacy
    path = Path(spec.privacy.hash_key_file).expanduser()
    return spec.privacy.model_copy(update={"hash_key_file": str(path if path.is_absolute() else base_dir / path)})


def _resolve_keys_file(spec: JobSpec, base_dir: Path) -> Any:
    """serve.auth.api_keys_file made absolute against the spec folder; not checked here: replicas read it."""
    auth = spec.serve.auth if spec.serve else None
    if spec.serve is None or auth is None or auth.api_keys_file is None:
        return spec.serve
    path = Path(auth.api_keys_file).expanduser()
    auth = auth.model_copy(update={"api_keys_file": str(path if path.is_absolute() else base_dir / path)})
    return spec.serve.model_copy(update={"auth": auth})


def _input_path(value: str, base_dir: Path) -> str | None:
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base_dir / path
    # Escaping the spec folder through `..` is fine for reading, but only for something that exists and is readable.
    if path.exists() and os.access(path, os.R_OK):
        return str(path.resolve())
    return None


def _pretrained_path(value: str, base_dir: Path) -> str | None:
    """`pkg:<module>/<sub/path>` names a folder inside an installed package; other values are paths or hub ids."""
    if value.startswith("pkg:"):
        module, _, sub = value[4:].partition("/")
        found = importlib.util.find_spec(module) if module else None
        if found is None or not found.submodule_search_locations:
            return None
        return _input_path(str(Path(list(found.submodule_search_locations)[0]) / sub), base_dir)
    local = _input_path(value, base_dir)
    if local or value.startswith((".", "/", "~")):
        return local
    return value  # a hub id: loaded (or refused offline) when the model is built


def _parse_override(source: str, item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise SpecError(source, [Problem(item, "an override looks like `train.optimizer.lr=3e-4`", 0)])
    try:
        value = read_value(text) if text.strip() else ""
    except DocumentError:
        value = text
    return key.strip(), coerce_exponent(value)


def _problem(error: ErrorDetails, lines: dict, overridden: set) -> Problem:
    loc = _without_tags(error["loc"])
    path = ".".join(str(p) for p in loc)
    message = error["msg"].removeprefix("Value error, ")
    value = error.get("input") if error["type"] not in ("missing", "extra_forbidden") else None
    if error["type"] == "extra_forbidden":
        known = _known_keys(error["loc"][:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean `{close[0]}`?" if close else f"known keys: {', '.join(known)}"
        message = f"unknown key; {hint}"
    elif error["type"] == "missing":
        message = "required field is missing"
    elif error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        loc, message, value = _union_tag_problem(loc, error)
        path = ".".join(str(p) for p in loc)
    line = (
        0
        if any(path == o or path.startswith(o + ".") or o.startswith(path + ".") for o in overridden)
        else _nearest_line(loc, lines)
    )
    return Problem(path, message, line, value)


def _union_tag_problem(loc: tuple, error: ErrorDetails) -> tuple[tuple, str, Any]:
    """A missing or unknown tag (model.family, tune.scheduler.name) reported at the tag's own field, with a guess."""
    ctx = error.get("ctx") or {}
    field = str(ctx.get("discriminator", "")).strip("'")
    tags = [tag.strip(" '") for tag in str(ctx.get("expected_tags", "")).split(",") if tag.strip(" '")]
    if not tags:  # union_tag_not_found carries no expected tags: read them from the union's members
        tags = sorted({t for m in _models_at(loc) if field in m.model_fields for t in _tags(m, field)})
    choices = f"use {', '.join(tags[:-1])} or {tags[-1]}" if len(tags) > 1 else f"use {''.join(tags)}"
    kind = "model family" if loc[-1:] == ("model",) else f"{loc[-1]} {field}"
    if error["type"] == "union_tag_not_found":
        return (*loc, field), f"required field is missing; {choices}", None
    tag = str(ctx.get("tag", ""))
    close = difflib.get_close_matches(tag, tags, n=1)
    hint = f"did you mean `{close[0]}`? " if close else ""
    return (*loc, field), f"unknown {kind}; {hint}{choices}", tag


def _tags(model: type[BaseModel], field: str) -> tuple:
    return get_args(model.model_fields[field].annotation)


def _nearest_line(loc: tuple, lines: dict) -> int | None:
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


# Discriminated unions put the tag into error locations: model.cnn.params.channels, tune.scheduler.asha.max_t.
UNION_TAGS = {"model": "family", "scheduler": "name"}


def _without_tags(loc: tuple) -> tuple:
    return tuple(part for i, part in enumerate(loc) if not (i and loc[i - 1] in UNION_TAGS and _is_tag(loc[: i + 1])))


def _is_tag(loc: tuple) -> bool:
    """Whether the last part of loc is the tag a union member is chosen by, rather than a field name."""
    tag = UNION_TAGS[loc[-2]]
    models = [m for m in _models_at(loc[:-1]) if tag in m.model_fields]
    return any(loc[-1] in get_args(m.model_fields[tag].annotation) for m in models)


def _known_keys(loc: tuple) -> list[str]:
    """Field names of the section at `loc`, following unions by their tag."""
    return sorted({name for m in _models_at(loc) for name in m.model_fields})


def _models_at(loc: tuple) -> list[type[BaseModel]]:
    models: list[type[BaseModel]] = [JobSpec]
    for part in loc:
        if isinstance(part, int):
            continue
        by_tag = [
            m
            for m in models
            for tag in UNION_TAGS.values()
            if m.model_fields.get(tag) and part in get_args(m.model_fields[tag].annotation)
        ]
        if by_tag:
            models = by_tag
            continue
        field = next((m.model_fields[part] for m in models if part in m.model_fields), None)
        if field is None:
            return []
        models = _section_types(field.annotation)
    return models


def _section_types(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [t for arg in get_args(annotation) for t in _section_types(arg)]
