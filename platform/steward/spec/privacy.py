"""The `privacy` section: PII masking of text columns, dropped identifiers and k-anonymity of quasi-identifiers."""

import difflib
import importlib.util
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from steward.spec.base import Section, raise_problems

# Entity types the rule-based recognizers find; `person` needs an NER backend (see `ner_backend`).
PATTERN_ENTITIES = (
    "email",
    "url",
    "iban",
    "credit_card",
    "ip_address",
    "national_id",
    "date_of_birth",
    "phone",
    "street_address",
)
ENTITIES = (*PATTERN_ENTITIES, "person")
Mode = Literal["redact", "replace", "hash"]


NER_MODELS = ("en_core_web_sm", "en_core_web_md", "en_core_web_lg")


def ner_backend() -> str | None:
    """The installed spaCy English pipeline that finds person names, or None (spaCy or no model installed)."""
    if importlib.util.find_spec("spacy") is None:
        return None
    return next((m for m in NER_MODELS if importlib.util.find_spec(m) is not None), None)


class QuasiIdentifier(Section):
    column: str = Field(description="A tabular column that could identify a person combined with others.")
    kind: Literal["numeric", "code"] = Field(
        description="numeric: bucketed into ranges (age 37 -> 35-39); code: truncated from the right (12345 -> 123**)."
    )
    bucket: float = Field(5.0, gt=0, le=1e12, description="numeric: width of the first bucket; each level doubles it.")
    max_level: int = Field(
        6, ge=0, le=30, description="Most generalisation steps (doublings, or characters removed) allowed."
    )


class KAnonymitySpec(Section):
    k: int = Field(ge=2, le=1_000_000, description="Every combination of quasi-identifiers must occur >= k times.")
    quasi_identifiers: list[QuasiIdentifier] = Field(min_length=1, description="Columns generalised towards k.")
    max_suppression: float = Field(
        0.05, ge=0.0, le=1.0, description="Largest share of rows that may be suppressed (removed) to reach k."
    )


class PrivacySpec(Section):
    text_columns: list[str] | None = Field(
        None, description="Text columns scanned and masked before tokenization (default: the input column)."
    )
    entities: list[str] = Field(
        default_factory=lambda: list(PATTERN_ENTITIES),
        description=f"Entity types to mask: {', '.join(ENTITIES)} (person needs the `ner` extra).",
    )
    mode: Mode = Field(
        "replace", description="redact (remove), replace (a type tag such as <EMAIL>) or hash (keyed HMAC token)."
    )
    modes: dict[str, Mode] = Field(default_factory=dict, description="Per-entity mode overriding `mode`.")
    hash_key_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Environment variable holding the HMAC key (hash mode)."
    )
    hash_key_file: str | None = Field(None, description="File holding the HMAC key (hash mode); never the key itself.")
    phone_region: str = Field(
        "US", pattern=r"^[A-Z]{2}$", description="Region whose national phone formats are recognised (ISO 3166)."
    )
    drop_columns: list[str] = Field(default_factory=list, description="Direct identifiers removed before anything.")
    k_anonymity: KAnonymitySpec | None = Field(None, description="Generalise quasi-identifiers to reach k-anonymity.")
    scan_rows: int = Field(1000, ge=1, le=10_000_000, description="Rows `steward privacy scan` samples.")

    @field_validator("entities", "modes")
    @classmethod
    def _known_entities(cls, value: list[str] | dict) -> list[str] | dict:
        problems = []
        for name in value:
            if name not in ENTITIES:
                close = difflib.get_close_matches(name, ENTITIES, n=1)
                hint = f"did you mean `{close[0]}`?" if close else f"known types are {', '.join(ENTITIES)}"
                problems.append(f"unknown entity type {name!r}; {hint}")
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "PrivacySpec":
        problems = {}
        if "person" in self.entities and ner_backend() is None:
            problems["entities"] = (
                "person names need an NER backend, and none is installed: pip install 'steward[ner]' and a spaCy "
                "English pipeline (python -m spacy download en_core_web_sm), or remove `person` from entities"
            )
        unused = sorted(set(self.modes) - set(self.entities))
        if unused:
            problems["modes"] = f"{unused} are not in entities; add them there or remove their modes"
        hashing = any(self.mode_of(e) == "hash" for e in self.entities)
        keys = (self.hash_key_env is not None) + (self.hash_key_file is not None)
        if hashing and keys != 1:
            problems["hash_key_env"] = "hash mode needs exactly one of hash_key_env or hash_key_file (the key's source)"
        elif not hashing and keys:
            problems["hash_key_env"] = "a hash key is only used by hash mode; remove it or set mode: hash"
        if self.k_anonymity:
            columns = [q.column for q in self.k_anonymity.quasi_identifiers]
            if len(set(columns)) < len(columns):
                problems["k_anonymity.quasi_identifiers"] = f"a column is listed twice in {columns}"
        raise_problems(self, problems)
        return self

    def mode_of(self, entity: str) -> Mode:
        """The masking mode of one entity type."""
        return self.modes.get(entity, self.mode)


def privacy_problems(spec: Any) -> dict[str, str]:
    """Cross-section checks of the privacy section against data (a JobSpec): which columns it may touch."""
    privacy, data = spec.privacy, spec.data
    if privacy is None:
        return {}
    problems: dict[str, str] = {}
    if spec.model.task == "causal_lm" and privacy.k_anonymity is not None:
        problems["privacy.k_anonymity"] = "k-anonymity generalises tabular columns of classification data; remove it"
    protected = [c for c in (data.input_column, data.label_column) if c]
    dropped = sorted(set(privacy.drop_columns) & set(protected + data.group_columns))
    if dropped:
        problems["privacy.drop_columns"] = f"{dropped} are read by data.*_column(s); drop other columns or read these"
    if privacy.k_anonymity is not None:
        clash = sorted({q.column for q in privacy.k_anonymity.quasi_identifiers} & set(protected))
        if clash:
            problems["privacy.k_anonymity.quasi_identifiers"] = f"{clash} are the input or label, not quasi-identifiers"
    return problems
