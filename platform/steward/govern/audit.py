"""The audit trail: an append-only JSONL log per project, hash-chained so that edits, removals and reorders show.

Every event is one line: `seq`, `time` (UTC), `who`, `event`, its own fields, `prev` (the previous event's hash)
and `hash` (SHA-256 of the line without `hash`). Writers take an exclusive `flock` on the log, read the last
line for `prev` and `seq`, and append the new line with one `write` on an O_APPEND descriptor, so several
processes (CLI calls, Ray workers on this node) never interleave or lose lines. A `.head` file beside the log
keeps the last `seq` and `hash`, so cutting lines off the end is caught too.

The log lives at $STEWARD_AUDIT_LOG, else `<output_dir>/audit.jsonl` (`runs/audit.jsonl` by default). A chain
proves order and integrity against edits of the file, not against someone who rewrites the whole chain and its
head: ship the head hash elsewhere (a ticket, a signed commit) when that matters.
"""

import fcntl
import getpass
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from steward import storage
from steward.errors import StewardError

ENV_LOG = "STEWARD_AUDIT_LOG"
LOG_NAME = "audit.jsonl"
GENESIS = "0" * 64
RESERVED_KEYS = ("seq", "time", "who", "event", "prev", "hash")


class AuditError(StewardError):
    """The log cannot be appended to (its last line is damaged); a person must check and repair it."""


def log_path(output_dir: str | Path = "runs") -> Path:
    """Where events go: $STEWARD_AUDIT_LOG, else `<output_dir>/audit.jsonl`.

    For a URI output_dir (s3://, gs://) the log stays in its local staging folder (steward.storage): object stores
    cannot append, and one log rewritten by many machines would lose events; point $STEWARD_AUDIT_LOG at a shared
    file to gather them.
    """
    env = os.environ.get(ENV_LOG)
    if env:
        return Path(env)
    if storage.is_uri(output_dir):
        return storage.staging_dir(str(output_dir)) / LOG_NAME
    return Path(output_dir) / LOG_NAME


def who() -> str:
    """The actor: $STEWARD_USER (set by CI or a gateway acting for someone), else user@host."""
    if os.environ.get("STEWARD_USER"):
        return os.environ["STEWARD_USER"]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def event_hash(entry: dict[str, Any]) -> str:
    """SHA-256 of the entry's canonical JSON, without its own `hash`."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def run_fields(run_dir: str | Path) -> dict[str, Any]:
    """The fields that tie an event to a run folder `runs/<job>/<run-id>/`: job, run id, folder, spec hash."""
    run_dir = Path(run_dir)
    status_file = run_dir / "status.json"
    status = json.loads(status_file.read_text()) if status_file.exists() else {}
    return {
        "job": run_dir.parent.name,
        "run_id": run_dir.name,
        "run_dir": str(run_dir),
        "spec_hash": status.get("spec_hash"),
    }


def file_hash(path: str | Path) -> str | None:
    """SHA-256 of a file's bytes (None when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record(event: str, *, log: str | Path | None = None, **fields: Any) -> dict[str, Any]:
    """Append one event (e.g. `run.finished`, `monitor.alert.raised`) with its fields; return the stored entry.

    Fields must be JSON-serialisable (other values are stored as their str()). Safe to call from several
    processes at once. `log` defaults to `log_path()`.
    """
    clash = set(fields) & set(RESERVED_KEYS)
    if clash:
        raise ValueError(f"audit.record: {sorted(clash)} are set by the log itself; rename those fields")
    path = Path(log) if log is not None else log_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        last = _last_entry(fd, path)
        entry: dict[str, Any] = {
            "seq": last["seq"] + 1 if last else 1,
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "who": who(),
            "event": event,
            **json.loads(json.dumps(fields, default=str)),  # the hash covers exactly what is stored
            "prev": last["hash"] if last else GENESIS,
        }
        entry["hash"] = event_hash(entry)
        os.write(fd, (json.dumps(entry) + "\n").encode())  # one write on O_APPEND: never interleaved
        _write_head(path, entry)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    return entry


def _last_entry(fd: int, path: Path) -> dict[str, Any] | None:
    """The log's last event, read backwards from the end (the log can be long)."""
    size, chunk = os.fstat(fd).st_size, 4096
    if size == 0:
        return None
    while True:
        start = max(0, size - chunk)
        tail = os.pread(fd, size - start, start).rstrip(b"\n").rsplit(b"\n", 1)
        if len(tail) == 2 or start == 0:
            break
        chunk *= 8
    try:
        return json.loads(tail[-1])
    except json.JSONDecodeError:
        raise AuditError(f"{path}: the last line is not a JSON event; run `steward audit verify`") from None


def head_path(log: Path) -> Path:
    return log.with_name(log.name + ".head")


def _write_head(log: Path, entry: dict[str, Any]) -> None:
    partial = log.with_name(log.name + ".head.partial")  # we hold the log's lock: one writer at a time
    partial.write_text(json.dumps({"seq": entry["seq"], "hash": entry["hash"]}) + "\n")
    partial.replace(head_path(log))


@dataclass(frozen=True)
class Verdict:
    """What `verify` found: the number of good events, and the first bad line (1-based) with why."""

    events: int
    bad_line: int | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.bad_line is None

    def __str__(self) -> str:
        if self.ok:
            return f"ok: {self.events} events, hash chain intact"
        return f"line {self.bad_line}: {self.problem}"


def verify(log: str | Path) -> Verdict:
    """Check every line's hash, its link to the line before, its sequence number, and the head file."""
    log = Path(log)
    if not log.exists():
        raise StewardError(f"{log}: no audit log there (set {ENV_LOG} or pass --log)")
    prev, count = GENESIS, 0
    with log.open("rb") as f:
        for number, raw in enumerate(f, 1):
            problem = _line_problem(raw, prev, number)
            if problem:
                return Verdict(count, number, problem)
            entry = json.loads(raw)
            prev, count = entry["hash"], count + 1
    return _check_head(log, count, prev)


def _line_problem(raw: bytes, prev: str, number: int) -> str | None:
    try:
        entry = json.loads(raw)
    except json.JSONDecodeError:
        return "not a JSON event (edited or truncated)"
    if not isinstance(entry, dict) or not {"hash", "prev", "seq"} <= set(entry):
        return "not an audit event (no hash, prev or seq)"
    if entry["hash"] != event_hash(entry):
        return "its content does not match its hash: the line was edited"
    if entry["prev"] != prev:
        return (
            f"does not follow line {number - 1}: a line was removed, reordered or inserted here, "
            "or the line before was edited and rehashed"
        )
    if entry["seq"] != number:
        return f"sequence number {entry['seq']} where {number} was expected: lines were removed or reordered"
    return None


def _check_head(log: Path, count: int, last_hash: str) -> Verdict:
    head = head_path(log)
    if not head.exists():
        return Verdict(count)
    recorded = json.loads(head.read_text())
    if recorded["seq"] > count:
        return Verdict(count, count + 1, f"missing: the head records {recorded['seq']} events, the log holds {count}")
    if recorded["seq"] == count and recorded["hash"] != last_hash:
        return Verdict(count, count, "does not match the hash the head file recorded for it")
    return Verdict(count)  # a head behind by one: a writer stopped between the line and the head


def events(log: str | Path) -> Iterator[dict[str, Any]]:
    """Every event of the log, in order (unparseable lines are skipped: `verify` reports them)."""
    log = Path(log)
    if not log.exists():
        return
    with log.open() as f:
        for raw in f:
            try:
                yield json.loads(raw)
            except json.JSONDecodeError:
                continue


def history(log: str | Path, run: str | None = None, deployment: str | None = None) -> list[dict[str, Any]]:
    """Events about one run (its id or folder) and/or one deployment (its Serve application name)."""
    chosen = []
    for entry in events(log):
        if run and run not in (entry.get("run_id"), entry.get("run_dir")) and not _under(entry, run):
            continue
        if deployment and entry.get("deployment") != deployment:
            continue
        chosen.append(entry)
    return chosen


def _under(entry: dict[str, Any], run: str) -> bool:
    run_dir = entry.get("run_dir")
    return bool(run_dir) and Path(str(run_dir)).name == Path(run).name
