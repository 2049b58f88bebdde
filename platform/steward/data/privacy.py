"""The privacy section applied to a source: drop identifiers, mask PII in text, k-anonymise quasi-identifiers.

It runs where the data is read (`prepare._tables`), before tokenization and splitting, so the tokenizer's
vocabulary, the model, the checkpoints and the run folder only ever see masked text. What was found is counted
per column and entity type (never the values) in the report that goes to `privacy.json` and metrics.json.
"""

import hashlib
import hmac
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from steward.data.errors import DataError
from steward.data.kanon import anonymise, choose_levels, generalise
from steward.data.partition import Columns
from steward.data.pii import find_spans
from steward.data.sources import Source
from steward.data.table import Table, num_rows, take
from steward.spec.privacy import PrivacySpec

REPORT_FILE = "privacy.json"


def hash_key(privacy: PrivacySpec) -> bytes | None:
    """The HMAC key from the environment variable or file the spec names; DataError when it is not there."""
    if privacy.hash_key_env is not None:
        value = os.environ.get(privacy.hash_key_env)
        if not value:
            raise DataError(
                "privacy.hash_key_env",
                f"environment variable {privacy.hash_key_env} is not set; "
                "export the key there (the spec names the variable, never the key)",
            )
        return value.encode()
    if privacy.hash_key_file is not None:
        path = Path(privacy.hash_key_file).expanduser()
        try:
            key = path.read_bytes().strip()
        except OSError as err:
            raise DataError("privacy.hash_key_file", f"cannot read the key file {str(path)!r}: {err}") from None
        if not key:
            raise DataError("privacy.hash_key_file", f"the key file {str(path)!r} is empty")
        return key
    return None


class Masker:
    """Masks the spec's entity types in texts and counts them; the same key gives the same hash tokens."""

    def __init__(self, privacy: PrivacySpec, key: bytes | None = None):
        self.privacy, self.key = privacy, key
        if key is None and any(privacy.mode_of(e) == "hash" for e in privacy.entities):
            raise ValueError("hash mode needs a key: pass hash_key(privacy)")

    def token(self, entity: str, value: str) -> str:
        """What replaces one found value under its entity type's mode."""
        mode = self.privacy.mode_of(entity)
        if mode == "redact":
            return ""
        if mode == "replace":
            return f"<{entity.upper()}>"
        assert self.key is not None  # checked in __init__
        # Normalised first (case, spaces, dashes) so "GB82 WEST..." and "gb82west..." are one person's IBAN.
        canonical = "".join(ch for ch in value.lower() if ch not in " -.()")
        digest = hmac.new(self.key, f"{entity}:{canonical}".encode(), hashlib.sha256).hexdigest()[:16]
        return f"<{entity.upper()}:{digest}>"

    def mask(self, text: str) -> tuple[str, Counter]:
        """The masked text and the count of each entity type found in it."""
        spans = find_spans(text, self.privacy.entities, self.privacy.phone_region)
        counts: Counter = Counter(s.entity for s in spans)
        for span in reversed(spans):  # right to left: earlier offsets stay valid
            text = text[: span.start] + self.token(span.entity, text[span.start : span.end]) + text[span.end :]
        return text, counts

    def mask_column(self, values: list[Any], column: str) -> tuple[list[Any], Counter]:
        """Mask every text of a column; DataError when the column does not hold text."""
        out: list[Any] = []
        total: Counter = Counter()
        for i, value in enumerate(values):
            if value is None:
                out.append(value)
                continue
            if not isinstance(value, str):
                raise DataError(
                    "privacy.text_columns",
                    f"column {column!r} holds {type(value).__name__} values "
                    f"(row {i}), not text; list only text columns",
                )
            masked, counts = self.mask(value)
            out.append(masked)
            total += counts
        return out, total


def text_columns(privacy: PrivacySpec, columns: Columns) -> list[str]:
    """The columns masked: the spec's text_columns, or the input column."""
    return list(privacy.text_columns) if privacy.text_columns is not None else [columns.input]


def protect_source(
    source: Source, columns: Columns, privacy: PrivacySpec, parts: list[str] | None = None
) -> tuple[Source, dict]:
    """The parts read (default: all) with only the columns a job reads, masked and k-anonymised; and a report.

    The report counts entities per column and type, dropped columns, rows, and the k-anonymity outcome.
    """
    parts = parts or list(source.parts)
    quasi = [q.column for q in privacy.k_anonymity.quasi_identifiers] if privacy.k_anonymity else []
    masked = text_columns(privacy, columns)
    names = list(dict.fromkeys([c for _, c in columns.fields()] + quasi + masked))
    _check_present(source, parts, names, privacy)
    masker = Masker(privacy, hash_key(privacy))
    report: dict[str, Any] = {"entities": {c: {} for c in masked}, "rows": 0}
    report["dropped_columns"] = sorted({c for p in source.parts for c in source.columns(p)} & set(privacy.drop_columns))
    tables: dict[str, Table] = {}
    for part in parts:
        table = source.read(part, names)
        for column in masked:
            table[column], counts = masker.mask_column(table[column], column)
            for entity, count in counts.items():
                report["entities"][column][entity] = report["entities"][column].get(entity, 0) + count
        report["rows"] += num_rows(table)
        tables[part] = table
    if privacy.k_anonymity is not None:
        tables, report["k_anonymity"] = _k_anonymise(tables, privacy)
    report["total"] = sum(sum(e.values()) for e in report["entities"].values())
    return Source(source.name, tables), report


def _check_present(source: Source, parts: list[str], names: list[str], privacy: PrivacySpec) -> None:
    problems = []
    for part in parts:
        have = source.columns(part)
        quasi = [q.column for q in privacy.k_anonymity.quasi_identifiers] if privacy.k_anonymity else []
        for column in names:
            missing = f"{column!r} is not a column of {source.name}; columns are {', '.join(have)}"
            if column not in have and column in quasi:
                problems.append(("privacy.k_anonymity.quasi_identifiers", missing))
            elif column not in have and column in (privacy.text_columns or []):
                problems.append(("privacy.text_columns", missing))
    DataError.raise_all(problems)


def _k_anonymise(parts: dict[str, Table], privacy: PrivacySpec) -> tuple[dict[str, Table], dict]:
    """Levels chosen over every part together (one release), then each part generalised and suppressed."""
    assert privacy.k_anonymity is not None
    spec = privacy.k_anonymity
    combined = {q.column: [v for t in parts.values() for v in t[q.column]] for q in spec.quasi_identifiers}
    levels = choose_levels(combined, spec)
    whole, report = anonymise(combined, spec, levels)
    keep_all = _kept_rows(combined, whole, spec, levels)
    out, start = {}, 0
    for name, table in parts.items():
        n = num_rows(table)
        generalised, _ = anonymise(table, spec.model_copy(update={"k": 1}), levels)  # generalise, suppress nothing
        out[name] = take(generalised, np.flatnonzero(keep_all[start : start + n]))
        start += n
    return out, report


def _kept_rows(combined: dict, whole: dict, spec: Any, levels: dict[str, int]) -> np.ndarray:
    keys = list(
        zip(*(generalise(combined[q.column], q, levels[q.column]) for q in spec.quasi_identifiers), strict=True)
    )
    kept = Counter(zip(*(whole[q.column] for q in spec.quasi_identifiers), strict=True))
    return np.array([kept[k] > 0 for k in keys], dtype=bool)


def scan(spec: Any) -> dict:
    """What the privacy section would find on a seeded sample of privacy.scan_rows rows, without training.

    Counts only (never values); a spec without a privacy section is scanned for every rule-based entity type.
    Hash modes are scanned as replace, so no key is needed to look.
    """
    from steward.data.partition import check_columns, parts_used, resolve_columns
    from steward.data.sources import load_source

    privacy = spec.privacy or PrivacySpec()
    looking = privacy.model_copy(update={"mode": "replace", "modes": {}, "hash_key_env": None, "hash_key_file": None})
    source = load_source(spec.data, spec.seed)
    columns = resolve_columns(spec, source)
    parts = parts_used(source, spec.data.splits)
    check_columns(source, columns, parts)
    rng = np.random.default_rng([spec.seed, 23])
    sampled = {}
    for part in dict.fromkeys(parts.values()):
        names = list(dict.fromkeys([c for _, c in columns.fields()] + text_columns(privacy, columns)))
        names += [q.column for q in privacy.k_anonymity.quasi_identifiers] if privacy.k_anonymity else []
        table = source.read(part, list(dict.fromkeys(names)))
        n = num_rows(table)
        sampled[part] = take(table, np.sort(rng.permutation(n)[: privacy.scan_rows]))
    _, report = protect_source(Source(source.name, sampled), columns, looking)
    everything = {c for part in parts.values() for c in source.columns(part)}
    report["dropped_columns"] = sorted(everything & set(privacy.drop_columns))
    return report
