"""The audit trail: a signed hash chain that names the first edited, removed, reordered or forged line, a log cut
short (its signed head, the pins in run folders and cards), garbage inputs as exit 2; safe concurrent writers."""

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from steward.cli import app
from steward.govern import audit, audit_key
from tests.conftest import ROOT


@pytest.fixture(autouse=True)
def key(tmp_path, monkeypatch):
    """This test's own audit key file (made on the first event), never the user's."""
    monkeypatch.delenv(audit_key.ENV_KEY, raising=False)
    monkeypatch.setenv(audit_key.ENV_KEY_FILE, str(tmp_path / "config" / "audit.key"))
    return tmp_path / "config" / "audit.key"


@pytest.fixture
def log(tmp_path):
    path = tmp_path / "audit.jsonl"
    for i in range(6):
        audit.record("run.started", log=path, run_id=f"run-{i}", job="quickstart", spec_hash=f"{i:016x}")
    return path


def lines(path):
    return path.read_text().splitlines(keepends=True)


def test_a_fresh_chain_verifies_and_links_every_event(log):
    verdict = audit.verify(log)
    assert verdict.ok and verdict.events == 6
    events = list(audit.events(log))
    assert events[0]["prev"] == audit.GENESIS and [e["seq"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert all(b["prev"] == a["hash"] == audit.event_hash(a) for a, b in zip(events, events[1:], strict=False))
    assert events[0]["who"] and events[0]["time"].endswith("+00:00")


def test_an_edited_line_is_named(log):
    rows = lines(log)
    rows[2] = rows[2].replace('"run-2"', '"run-X"')
    log.write_text("".join(rows))
    verdict = audit.verify(log)
    assert (verdict.bad_line, verdict.events) == (3, 2) and "edited" in verdict.problem


def test_an_edited_and_rehashed_line_fails_its_signature(log):
    rows = [json.loads(r) for r in lines(log)]
    rows[2]["run_id"] = "run-X"
    rows[2]["hash"] = audit.event_hash(rows[2])
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    verdict = audit.verify(log)
    assert verdict.bad_line == 3 and "signature" in verdict.problem


def test_a_removed_line_is_named(log):
    rows = lines(log)
    del rows[3]
    log.write_text("".join(rows))
    verdict = audit.verify(log)
    assert verdict.bad_line == 4 and "removed" in verdict.problem


def test_reordered_lines_are_named(log):
    rows = lines(log)
    rows[1], rows[4] = rows[4], rows[1]
    log.write_text("".join(rows))
    assert audit.verify(log).bad_line == 2


def test_a_removed_last_line_is_caught_by_the_head(log):
    log.write_text("".join(lines(log)[:-1]))
    verdict = audit.verify(log)
    assert verdict.bad_line == 6 and "missing" in verdict.problem


def test_garbage_is_named_and_stops_further_appends(log):
    log.write_text("".join(lines(log)[:5]) + "not json\n")
    assert audit.verify(log).bad_line == 6
    with pytest.raises(audit.AuditError, match="last line"):
        audit.record("run.finished", log=log)


def test_reserved_field_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="hash"):
        audit.record("x", log=tmp_path / "a.jsonl", hash="forged")


WRITER = """
import sys
from steward.govern import audit, audit_key
for i in range(200):
    audit.record("monitor.alert.raised", log=sys.argv[1], writer=int(sys.argv[2]), i=i, note="x" * (i % 50))
"""


def test_four_processes_times_200_events_leave_a_valid_chain_with_every_event(tmp_path):
    log = tmp_path / "audit.jsonl"
    env = {"PYTHONPATH": str(ROOT / "platform")}
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(log), str(k)], env={**os.environ, **env}) for k in range(4)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    verdict = audit.verify(log)
    assert verdict.ok and verdict.events == 800, verdict
    seen = {(e["writer"], e["i"]) for e in audit.events(log)}
    assert seen == {(k, i) for k in range(4) for i in range(200)}
    # interleaved, not four blocks: the lock is taken per event
    writers = [e["writer"] for e in audit.events(log)]
    assert sum(a != b for a, b in zip(writers, writers[1:], strict=False)) > 3


def test_cli_verify_and_show(log):
    runner = CliRunner()
    ok = runner.invoke(app, ["audit", "verify", "--log", str(log)])
    assert ok.exit_code == 0 and "6 events" in ok.output
    audit.record("deployment.created", log=log, deployment="digits", run_id="run-2")
    shown = runner.invoke(app, ["audit", "show", "--log", str(log), "--run", "run-2"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and shown.output.count("run-2") == 2 and "run-3" not in shown.output
    shown = runner.invoke(app, ["audit", "show", "--log", str(log), "--deployment", "digits"], env={"COLUMNS": "200"})
    assert "deployment.created" in shown.output and "run.started" not in shown.output
    rows = lines(log)
    rows[0], rows[1] = rows[1], rows[0]
    log.write_text("".join(rows))
    bad = runner.invoke(app, ["audit", "verify", "--log", str(log)])
    assert bad.exit_code == 1 and "line 1" in bad.output


def test_the_log_lives_under_the_runs_folder_unless_configured(tmp_path, monkeypatch):
    monkeypatch.delenv(audit.ENV_LOG, raising=False)
    assert audit.log_path(tmp_path) == tmp_path / "audit.jsonl"
    monkeypatch.setenv(audit.ENV_LOG, str(tmp_path / "elsewhere.jsonl"))
    assert audit.log_path(tmp_path) == tmp_path / "elsewhere.jsonl"


# -- a log cut short or forged by someone who can write its folder but does not hold the key ----------------------


def rewrite(path, rows):
    """Rewrite the log with these events, each rehashed and re-linked as a forger without the key would."""
    prev = audit.GENESIS
    for seq, row in enumerate(rows, 1):
        row |= {"seq": seq, "prev": prev}
        row["hash"] = prev = audit.event_hash(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_truncated_last_record_is_named(log):
    log.write_text(log.read_text()[:-40])
    verdict = audit.verify(log)
    assert verdict.bad_line == 6 and "not a JSON event" in verdict.problem


def test_the_last_record_removed_with_the_head_is_caught(log):
    log.write_text("".join(lines(log)[:-1]))
    audit.head_path(log).unlink()
    verdict = audit.verify(log)
    assert not verdict.ok and "head" in verdict.problem and "missing" in verdict.problem


def test_a_deleted_head_is_caught(log):
    audit.head_path(log).unlink()
    assert "missing" in audit.verify(log).problem


def test_an_edited_head_is_caught(log):
    head = json.loads(audit.head_path(log).read_text())
    audit.head_path(log).write_text(json.dumps(head | {"seq": 5, "hash": json.loads(lines(log)[4])["hash"]}))
    log.write_text("".join(lines(log)[:-1]))
    assert "head was edited" in audit.verify(log).problem


def test_an_appended_event_with_a_correct_hash_is_caught(log):
    rows = [json.loads(r) for r in lines(log)]
    forged = {k: v for k, v in rows[-1].items() if k not in ("hash", "mac")} | {"event": "deployment.created"}
    rewrite(log, [*rows, forged])
    verdict = audit.verify(log)
    assert verdict.bad_line == 7 and "not signed: forged" in verdict.problem


def test_a_rewritten_chain_is_caught_even_with_every_hash_correct(log):
    rows = [json.loads(r) for r in lines(log)]
    rewrite(log, rows[:2] + rows[3:])  # one event dropped, the rest renumbered and rehashed
    assert audit.verify(log).bad_line == 3


def test_a_deleted_first_record_is_reported_as_removed_from_the_start(log):
    log.write_text("".join(lines(log)[1:]))
    verdict = audit.verify(log)
    assert verdict.bad_line == 1 and "removed from its start" in verdict.problem and "line 0" not in str(verdict)


def test_a_head_one_behind_is_a_writer_stopped_midway_but_two_behind_is_stale(log):
    saved = audit.head_path(log).read_text()
    audit.record("run.finished", log=log)
    audit.head_path(log).write_text(saved)  # the writer stopped between its line and the head
    assert audit.verify(log).ok
    audit.record("run.finished", log=log)
    audit.head_path(log).write_text(saved)
    assert "stale" in audit.verify(log).problem


def run_folder(output_dir, log, job="quickstart", run_id="run-a"):
    run_dir = output_dir / job / run_id
    run_dir.mkdir(parents=True)
    audit.pin(run_dir, audit.record("run.finished", log=log, run_id=run_id), log)
    return run_dir


def test_a_log_cut_back_with_an_older_head_is_caught_by_a_run_folders_pin(tmp_path):
    log = tmp_path / "audit.jsonl"
    audit.record("run.started", log=log)
    older_log, older_head = log.read_text(), audit.head_path(log).read_text()
    run_folder(tmp_path, log)
    log.write_text(older_log)
    audit.head_path(log).write_text(older_head)
    assert audit.verify(log).ok  # the log alone cannot tell: a saved head is a valid head
    verdict = audit.verify(log, tmp_path)
    assert not verdict.ok and "audit_head.json pins event 2" in verdict.problem


def test_a_model_cards_pin_catches_a_log_cut_back_and_a_forged_pin_is_caught(tmp_path):
    log = tmp_path / "audit.jsonl"
    audit.record("run.started", log=log)
    older_log, older_head = log.read_text(), audit.head_path(log).read_text()
    audit.record("run.started", log=log)
    card_dir = tmp_path / "job" / "run-b"
    card_dir.mkdir(parents=True)
    (card_dir / audit.CARD_FILE).write_text(json.dumps({"audit": audit.last_pin(log)}))
    assert audit.verify(log, tmp_path).ok
    log.write_text(older_log)
    audit.head_path(log).write_text(older_head)
    assert "model_card.json pins event 2" in audit.verify(log, tmp_path).problem
    card = json.loads((card_dir / audit.CARD_FILE).read_text())
    card["audit"]["hash"] = json.loads(older_log)["hash"]
    (card_dir / audit.CARD_FILE).write_text(json.dumps(card))
    assert "not signed" in audit.verify(log, tmp_path).problem


def test_a_log_signed_with_another_key_names_both_keys(log, monkeypatch):
    monkeypatch.setenv(audit_key.ENV_KEY, "another-key-of-32-characters-xxx")
    problem = audit.verify(log).problem
    assert "signed with key" in problem and audit_key.key_id(b"another-key-of-32-characters-xxx") in problem


def test_the_key_is_made_once_private_and_refused_when_others_can_read_it(log, key):
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_text().strip()) == 64
    key.chmod(0o644)
    with pytest.raises(audit.StewardError, match="chmod 600"):
        audit.record("run.started", log=log)


# -- garbage in: exit 2, the file named, no traceback -----------------------------------------------------------


def garbage(kind, log, tmp_path):
    if kind == "not utf-8":
        log.write_bytes(b"\xff\xfe" + bytes(range(256)) + b"\n")
    elif kind == "a folder":
        log = tmp_path / "folder"
        log.mkdir()
    elif kind == "empty":
        log.write_text("")
    elif kind == "garbage head":
        audit.head_path(log).write_bytes(b"\x00\x9fnot a head")
    elif kind == "no key":
        os.environ[audit_key.ENV_KEY_FILE] = str(tmp_path / "nowhere" / "audit.key")  # the fixture restores it
    return log


@pytest.mark.parametrize("kind", ["not utf-8", "a folder", "empty", "garbage head", "no key"])
@pytest.mark.parametrize("command", ["verify", "show"])
def test_garbage_input_exits_2_naming_the_file(log, tmp_path, kind, command):
    path = garbage(kind, log, tmp_path)
    out = CliRunner().invoke(app, ["audit", command, "--log", str(path)], env={"COLUMNS": "300"})
    if command == "show" and kind in ("garbage head", "no key"):  # show reads the events only
        assert out.exit_code == 0 and "run-5" in out.output
        return
    assert out.exit_code == 2, out.output
    named = audit.head_path(path).name if kind == "garbage head" else "audit.key" if kind == "no key" else path.name
    assert out.output.startswith("error: ") and named in out.output and "Traceback" not in out.output
