"""The audit trail: a hash chain that names the first edited, removed or reordered line; safe concurrent writers."""

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from steward.cli import app
from steward.govern import audit
from tests.conftest import ROOT


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


def test_an_edited_and_rehashed_line_breaks_the_next_link(log):
    rows = [json.loads(r) for r in lines(log)]
    rows[2]["run_id"] = "run-X"
    rows[2]["hash"] = audit.event_hash(rows[2])
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert audit.verify(log).bad_line == 4


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
from steward.govern import audit
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
