"""Privacy of training data: PII recognizers against labelled records, masking modes, k-anonymity, spec errors."""

import json
from collections import Counter

import pytest
import yaml

from steward.data import DataError, prepare_data
from steward.data.kanon import achieved_k, anonymise, choose_levels
from steward.data.pii import find_spans, iban_valid, luhn_valid
from steward.data.prepare import _tables
from steward.data.privacy import Masker, hash_key
from steward.spec import SpecError, load_job
from steward.spec.privacy import PATTERN_ENTITIES, KAnonymitySpec, PrivacySpec
from tests.pii_corpus import RECORDS

# Floors the recognizers must keep on the labelled corpus (measured: every type at 1.00 / 1.00).
FLOORS = {"precision": 0.9, "recall": 0.9}


def detection_scores() -> dict[str, dict[str, float]]:
    """Precision and recall per entity type: a found span counts only with the exact value and type."""
    tp, fp, fn = Counter(), Counter(), Counter()
    for text, expected in RECORDS:
        found = {(text[s.start : s.end], s.entity) for s in find_spans(text, list(PATTERN_ENTITIES))}
        for _, entity in found & set(expected):
            tp[entity] += 1
        for _, entity in found - set(expected):
            fp[entity] += 1
        for _, entity in set(expected) - found:
            fn[entity] += 1
    return {
        e: {
            "precision": tp[e] / max(1, tp[e] + fp[e]),
            "recall": tp[e] / max(1, tp[e] + fn[e]),
            "support": tp[e] + fn[e],
        }
        for e in PATTERN_ENTITIES
    }


def test_precision_and_recall_per_entity_type_on_labelled_records():
    scores = detection_scores()
    print(
        "\n"
        + "\n".join(f"{e:15} P={s['precision']:.2f} R={s['recall']:.2f} n={s['support']}" for e, s in scores.items())
    )
    for entity, score in scores.items():
        assert score["support"] >= 2, entity
        assert score["precision"] >= FLOORS["precision"] and score["recall"] >= FLOORS["recall"], (entity, score)


def test_checksums_tell_valid_cards_and_ibans_from_typos():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("GB82 WEST 1234 5698 7654 32") and not iban_valid("GB82 WEST 1234 5698 7654 33")
    no_pii = [t for t, expected in RECORDS if not expected]
    assert len(no_pii) >= 15 and all(find_spans(t, list(PATTERN_ENTITIES)) == [] for t in no_pii)


def test_replace_and_redact_modes():
    text = "Mail jane@x.org or call +44 20 7946 0958 now"
    replaced, counts = Masker(PrivacySpec()).mask(text)
    assert replaced == "Mail <EMAIL> or call <PHONE> now" and counts == {"email": 1, "phone": 1}
    redacted, _ = Masker(PrivacySpec(mode="redact", modes={"email": "replace"})).mask(text)
    assert redacted == "Mail <EMAIL> or call  now"


def test_hash_is_stable_under_one_key_and_differs_across_keys(monkeypatch):
    monkeypatch.setenv("PII_KEY", "k1")
    spec = PrivacySpec(mode="hash", hash_key_env="PII_KEY")
    one = Masker(spec, hash_key(spec))
    a, _ = one.mask("IBAN GB82 WEST 1234 5698 7654 32 from jane@x.org")
    b, _ = one.mask("again gb82west12345698765432, jane@x.org")
    token = a.split()[1]
    assert token.startswith("<IBAN:") and token in b and a.split()[-1] == b.split()[-1]
    assert "jane" not in a and "GB82" not in a
    monkeypatch.setenv("PII_KEY", "k2")
    other, _ = Masker(spec, hash_key(spec)).mask("IBAN GB82 WEST 1234 5698 7654 32 from jane@x.org")
    assert other.split()[1] != token and other.split()[1].startswith("<IBAN:")


def test_hash_key_from_a_file_and_a_missing_key_names_the_field(tmp_path, monkeypatch):
    (tmp_path / "key").write_text("s3cret\n")
    assert hash_key(PrivacySpec(mode="hash", hash_key_file=str(tmp_path / "key"))) == b"s3cret"
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(DataError, match="privacy.hash_key_env: environment variable NO_SUCH_KEY is not set"):
        hash_key(PrivacySpec(mode="hash", hash_key_env="NO_SUCH_KEY"))


def test_k_anonymity_generalises_suppresses_and_is_verified():
    ages = [23, 24, 25, 27, 31, 33, 34, 38, 41, 44, 45, 47, 52, 58, 63, 90]
    zips = ["94107", "94110", "94103", "94117", "10001", "10002", "10003", "10011"] * 2
    table = {"age": ages, "zip": zips, "label": list(range(16))}
    spec = KAnonymitySpec(
        k=3,
        quasi_identifiers=[{"column": "age", "kind": "numeric", "bucket": 10}, {"column": "zip", "kind": "code"}],
        max_suppression=0.2,
    )
    levels = choose_levels(table, spec)
    out, report = anonymise(table, spec, levels)
    assert achieved_k(out, ["age", "zip"]) >= 3 == report["k"] and report["achieved_k"] >= 3
    assert report["suppressed_rows"] == 16 - len(out["label"]) <= 0.2 * 16
    assert all(v.endswith("*") for v in out["zip"]) and all("-" in v for v in out["age"])


def test_unreachable_k_is_an_error_naming_the_fix():
    table = {"age": [1, 50, 99], "zip": ["1", "2", "3"]}
    spec = KAnonymitySpec(k=2, quasi_identifiers=[{"column": "zip", "kind": "code", "max_level": 0}])
    with pytest.raises(DataError, match=r"privacy.k_anonymity.k: k=2 cannot be reached.*lower k"):
        choose_levels(table, spec)
    with pytest.raises(DataError, match="k=5 cannot be reached with 3 rows"):
        choose_levels(table, spec.model_copy(update={"k": 5}))


# --- through the spec and the data path ---------------------------------------------------------------------

PII_ROWS = [
    ("Contact jane.roe@mail.com about the refund", "a", 34, "94107"),
    ("Call +44 20 7946 0958 tomorrow please", "b", 36, "94110"),
    ("Card 4111 1111 1111 1111 was charged twice", "a", 45, "10001"),
    ("Wire it to GB82 WEST 1234 5698 7654 32 today", "b", 47, "10002"),
    ("Great service and friendly staff", "a", 52, "10003"),
    ("Terrible food, cold and late", "b", 58, "94103"),
]


def pii_job(tmp_path, privacy, rows=40, **data):
    lines = [
        json.dumps({"text": t, "label": i % 2, "group": g, "age": age + i % 4, "zip": z, "ssn": f"{i:03d}-45-6789"})
        for i in range(rows)
        for t, g, age, z in [PII_ROWS[i % len(PII_ROWS)]]
    ]
    (tmp_path / "pii.jsonl").write_text("\n".join(lines) + "\n")
    raw = {
        "name": "pii",
        "output_dir": str(tmp_path / "runs"),
        "data": {
            "source": "file:pii.jsonl",
            "input_column": "text",
            "label_column": "label",
            "group_columns": ["group"],
            "max_length": 16,
            "tokenizer": {"vocab_size": 60},
            **data,
        },
        "model": {"family": "lstm", "params": {"hidden_size": 8, "embedding_dim": 8}},
        "privacy": privacy,
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "job.yaml"


def test_prepare_masks_before_tokenizing_and_records_counts_not_values(tmp_path):
    path = pii_job(tmp_path, {"drop_columns": ["ssn"]})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    prepare_data(load_job(path), run_dir)
    report = json.loads((run_dir / "privacy.json").read_text())
    assert report["entities"]["text"] == {"email": 7, "phone": 7, "credit_card": 7, "iban": 7}
    assert report["dropped_columns"] == ["ssn"] and report["rows"] == 40
    written = "".join(p.read_text(errors="ignore") for p in run_dir.rglob("*") if p.is_file()).lower()
    for raw in ("jane", "roe@mail", "7946", "4111", "west", "6789"):
        assert raw not in written, raw
    assert "<email>" in written or "email" in written  # the tag is in the vocabulary, the address is not


def test_k_anonymity_through_the_data_path_is_verified_on_the_output(tmp_path):
    quasi = [{"column": "age", "kind": "numeric", "bucket": 5}, {"column": "zip", "kind": "code"}]
    path = pii_job(tmp_path, {"k_anonymity": {"k": 4, "quasi_identifiers": quasi}}, group_columns=["age", "zip"])
    report: dict = {}
    _, tables = _tables(load_job(path), report)
    assert report["k_anonymity"]["achieved_k"] >= 4 and report["k_anonymity"]["levels"]["age"] >= 1
    released = {c: [v for t in tables.values() for v in t[c]] for c in ("age", "zip")}
    assert achieved_k(released, ["age", "zip"]) >= 4 and all("-" in a for a in released["age"])
    assert len(released["age"]) == 40 - report["k_anonymity"]["suppressed_rows"]


@pytest.mark.parametrize(
    ("privacy", "path", "fragment"),
    [
        ({"entities": ["emial"]}, "privacy.entities", "unknown entity type 'emial'; did you mean `email`?"),
        ({"entities": ["email", "person"]}, "privacy.entities", "pip install 'steward[ner]'"),
        ({"mode": "hash"}, "privacy.hash_key_env", "hash mode needs exactly one of hash_key_env or hash_key_file"),
        ({"modes": {"phone": "hash"}, "entities": ["email"]}, "privacy.modes", "not in entities"),
        ({"drop_columns": ["text"]}, "privacy.drop_columns", "are read by data"),
    ],
)
def test_bad_privacy_sections_name_the_field_and_the_fix(tmp_path, privacy, path, fragment):
    with pytest.raises(SpecError) as err:
        load_job(pii_job(tmp_path, privacy))
    assert any(p.path == path and fragment in p.message for p in err.value.problems), err.value.problems


def test_unreachable_k_and_a_missing_column_fail_before_training(tmp_path):
    quasi = [{"column": "zip", "kind": "code", "max_level": 1}]
    spec = load_job(pii_job(tmp_path, {"k_anonymity": {"k": 30, "quasi_identifiers": quasi}}))
    with pytest.raises(DataError, match="privacy.k_anonymity.k: k=30 cannot be reached"):
        prepare_data(spec, None)
    spec = load_job(pii_job(tmp_path, {}, group_columns=["region"]))
    with pytest.raises(DataError, match="data.group_columns: 'region' is not a column of"):
        prepare_data(spec, None)


def test_privacy_scan_command_shows_counts_never_values(tmp_path):
    from typer.testing import CliRunner

    from steward.cli import app

    path = pii_job(tmp_path, {"drop_columns": ["ssn"], "scan_rows": 100})
    result = CliRunner().invoke(app, ["privacy", "scan", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "sample of 40 rows" in result.output and "dropped columns: ssn" in result.output
    counts = {
        line.split("│")[2].strip(): line.split("│")[3].strip()
        for line in result.output.splitlines()
        if line.count("│") == 4
    }
    assert set(counts) == {"email", "phone", "credit_card", "iban"} and set(counts.values()) == {"7"}
    assert "jane" not in result.output and "4111" not in result.output
    bad = CliRunner().invoke(app, ["privacy", "scan", str(path), "--set", "privacy.entities=[emial]"])
    assert bad.exit_code == 2 and "did you mean `email`" in bad.output


def test_a_relative_hash_key_file_resolves_against_the_spec_folder(tmp_path, monkeypatch):
    (tmp_path / "secret.key").write_text("file-key")
    spec = load_job(pii_job(tmp_path, {"mode": "hash", "hash_key_file": "secret.key"}))
    monkeypatch.chdir("/")
    assert spec.privacy.hash_key_file == str(tmp_path / "secret.key") and hash_key(spec.privacy) == b"file-key"
