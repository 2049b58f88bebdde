"""The audit trail: an append-only JSONL log per project, hash-chained and signed, so that edits, removals,
reorders, forged appends and a shortened log show.

Every event is one line: `seq`, `time` (UTC), `who`, `event`, its own fields, `key_id`, `prev` (the previous
event's hash), `hash` (SHA-256 of the line without `hash` and `mac`) and `mac` (an HMAC of `hash` under the audit
key, steward.govern.audit_key, kept outside the log's folder). Writers take an exclusive `flock` on the log, read
the last line for `prev` and `seq`, and append the new line with one `write` on an O_APPEND descriptor, so several
processes (CLI calls, Ray workers on this node) never interleave or lose lines. A signed `.head` file beside the
log keeps the last `seq` and `hash`; every run folder pins the event of its last state change (`audit_head.json`)
and its model card the head when the card was written.

What `steward audit verify` catches, for someone who can write the log's folder but does not hold the key:
- an edited event, even rehashed (its `mac` no longer matches), a removed, inserted or reordered one (the chain);
- an appended or replaced event, even with a correct hash (it cannot be signed without the key);
- the last events cut off (the signed head, and the pins of runs that saw them), the head deleted or edited, the
  head deleted together with the last events (a log with lines needs its head), an emptied log.
What it does not catch: someone who holds the key (the user, or whoever reads their key file or
$STEWARD_AUDIT_KEY) can rewrite everything; the log cut back to an earlier state together with a copy of the head
saved at that state, when no run folder pins a later event (deleting those pins too goes unseen); a whole log and
its head deleted. Ship a head's hash elsewhere (a ticket, a signed commit) when that matters.

The log lives at $STEWARD_AUDIT_LOG, else `<output_dir>/audit.jsonl` (`runs/audit.jsonl` by default).
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
from steward.govern import audit_key

ENV_LOG = "STEWARD_AUDIT_LOG"
LOG_NAME = "audit.jsonl"
GENESIS = "0" * 64
RESERVED_KEYS = ("seq", "time", "who", "event", "key_id", "prev", "hash", "mac")
EMPTY = "the audit log is empty; steward never leaves it empty, so its events were removed"
CARD_FILE = "model_card.json"  # steward.govern.card's name for it (card imports this module, not the other way)
PIN = "audit_head.json"  # in a run folder: the signed event of the run's last state change


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
    """SHA-256 of the entry's canonical JSON, without its own `hash` and `mac`."""
    body = {k: v for k, v in entry.items() if k not in ("hash", "mac")}
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
    key = audit_key.load_key(create=True)
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
            "key_id": audit_key.key_id(key),
            "prev": last["hash"] if last else GENESIS,
        }
        entry["hash"] = event_hash(entry)
        entry["mac"] = audit_key.sign(key, "event", entry["hash"])
        os.write(fd, (json.dumps(entry) + "\n").encode())  # one write on O_APPEND: never interleaved
        _write_head(path, entry, key)
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
        last = json.loads(tail[-1])
    except ValueError:  # not JSON, or not UTF-8
        last = None
    if not isinstance(last, dict) or not isinstance(last.get("seq"), int) or not isinstance(last.get("hash"), str):
        raise AuditError(f"{path}: the last line is not a JSON event; run `steward audit verify`")
    return last


def head_path(log: Path) -> Path:
    return log.with_name(log.name + ".head")


def _write_head(log: Path, entry: dict[str, Any], key: bytes) -> None:
    partial = log.with_name(log.name + ".head.partial")  # we hold the log's lock: one writer at a time
    mac = audit_key.sign(key, "head", entry["seq"], entry["hash"])
    partial.write_text(json.dumps({"seq": entry["seq"], "hash": entry["hash"], "key_id": entry["key_id"], "mac": mac}))
    partial.replace(head_path(log))


# -- pins: a signed event copied into a run folder, so a log cut back to before it shows ---------------------------


def pin_of(entry: dict[str, Any], log: str | Path) -> dict[str, Any]:
    """The pin of an event as `record` returned it: which log, which event, and the event's own signature."""
    return {"log": str(Path(log).resolve()), "seq": entry["seq"], "hash": entry["hash"], "mac": entry["mac"]}


def pin(run_dir: str | Path, entry: dict[str, Any], log: str | Path) -> None:
    """Pin `entry` into the run folder (replacing the pin of the run's previous state change)."""
    (Path(run_dir) / PIN).write_text(json.dumps(pin_of(entry, log)) + "\n")


def last_pin(log: str | Path) -> dict[str, Any] | None:
    """The log's last event as a pin (a model card carries it), or None when there is no log yet."""
    path = Path(log)
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        last = _last_entry(fd, path)
    finally:
        os.close(fd)  # closing releases the lock
    return pin_of(last, path) if last and "mac" in last else None


Pins = dict[int, tuple[str, Path]]  # seq -> (hash, the file that pins that event)


def _pins(runs: Path, log: Path, key: bytes) -> tuple[Pins, "Verdict | None"]:
    """The pins of this log in the run folders under `runs`; a forged pin is a finding, a foreign one is skipped."""
    target = str(log.resolve())
    pinned: Pins = {}
    for path in sorted([*runs.glob(f"*/*/{PIN}"), *runs.glob(f"*/*/{CARD_FILE}")]):
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError):
            continue
        found = data.get("audit") if isinstance(data, dict) and path.name == CARD_FILE else data
        if not isinstance(found, dict) or found.get("log") != target or not isinstance(found.get("seq"), int):
            continue
        if not audit_key.signed(key, found.get("mac"), "event", found.get("hash")):
            return {}, Verdict(0, found["seq"], f"the pin in {path} is not signed by the audit key: it was edited")
        pinned.setdefault(found["seq"], (found["hash"], path))
    return pinned, None


@dataclass(frozen=True)
class Verdict:
    """What `verify` found: the number of good events, and the first bad line (1-based) with why."""

    events: int
    bad_line: int | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def __str__(self) -> str:
        if self.ok:
            return f"ok: {self.events} events, hash chain, signatures and head intact"
        return f"line {self.bad_line}: {self.problem}" if self.bad_line else str(self.problem)


def verify(log: str | Path, runs: str | Path | None = None) -> Verdict:
    """Check every line's hash, signature, link and sequence number, the signed head, and the pins of the run
    folders under `runs`. What is no audit log at all (a folder, not UTF-8, empty, a garbage head) is a
    StewardError naming the file."""
    log = Path(log)
    _check_is_log(log)
    key = audit_key.load_key()
    pinned, forged = _pins(Path(runs), log, key) if runs is not None else ({}, None)
    if forged:
        return forged
    before, prev, count = GENESIS, GENESIS, 0
    with log.open("rb") as f:
        for number, raw in enumerate(f, 1):
            entry, problem = _line(raw, log, number, prev, key)
            if entry and number in pinned and entry["hash"] != pinned[number][0]:
                problem = f"{pinned[number][1]} pins another event here: the log was rewritten after that run"
            if problem or entry is None:
                return Verdict(count, number, problem)
            before, prev, count = prev, entry["hash"], count + 1
    if count == 0:
        raise StewardError(f"{log}: {EMPTY}")
    beyond = [seq for seq in pinned if seq > count]
    if beyond:
        where = pinned[max(beyond)][1]
        return Verdict(count, count + 1, f"missing: {where} pins event {max(beyond)}, the log holds {count}")
    return _check_head(log, count, prev, before, key)


def _check_is_log(log: Path) -> None:
    if not log.exists():
        raise StewardError(f"{log}: no audit log there (set {ENV_LOG} or pass --log)")
    if not log.is_file():
        raise StewardError(f"{log}: a folder, not an audit log; pass the audit.jsonl file with --log")


def _text(raw: bytes, log: Path, number: int) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise StewardError(f"{log}: line {number} is not UTF-8 text, so this is no audit log; check --log") from None


def _line(raw: bytes, log: Path, number: int, prev: str, key: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """The line's event and what is wrong with it (None when it is good)."""
    try:
        entry = json.loads(_text(raw, log, number))
    except ValueError:
        return None, "not a JSON event (edited or truncated)"
    if not isinstance(entry, dict) or not {"hash", "prev", "seq"} <= set(entry):
        return None, "not an audit event (no hash, prev or seq)"
    if entry["hash"] != event_hash(entry):
        return None, "its content does not match its hash: the line was edited"
    if not audit_key.signed(key, entry.get("mac"), "event", entry["hash"]):
        mine, theirs = audit_key.key_id(key), entry.get("key_id")
        if theirs and theirs != mine:
            return None, f"signed with key {theirs}, not yours ({mine}): verify with the key that wrote it"
        if "mac" not in entry:
            return None, "it is not signed: forged, or written by a steward from before events were signed"
        return None, "its signature does not match: the line was forged, or edited and rehashed"
    return entry, _link_problem(entry, prev, number)


def _link_problem(entry: dict[str, Any], prev: str, number: int) -> str | None:
    if entry["prev"] != prev and number == 1:
        return f"the log starts at event {entry['seq']}, which follows another: events were removed from its start"
    if entry["prev"] != prev:
        return (
            f"does not follow line {number - 1}: a line was removed, reordered or inserted here, "
            "or the line before was edited and rehashed"
        )
    if entry["seq"] != number:
        return f"sequence number {entry['seq']} where {number} was expected: lines were removed or reordered"
    return None


def _check_head(log: Path, count: int, last: str, before: str, key: bytes) -> Verdict:
    head = head_path(log)
    if not head.exists():
        return Verdict(count, count, f"the signed head {head.name} is missing: the last events may be gone with it")
    try:
        recorded = json.loads(head.read_bytes())
    except (OSError, ValueError):
        recorded = None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("seq"), int):
        raise StewardError(f"{head}: not an audit head (a JSON object with seq, hash, mac); the log cannot be checked")
    seq, recorded_hash = recorded["seq"], recorded.get("hash")
    if not audit_key.signed(key, recorded.get("mac"), "head", seq, recorded_hash):
        return Verdict(count, None, f"{head.name}: its signature does not match: the head was edited or forged")
    if seq > count:
        return Verdict(count, count + 1, f"missing: the head records {seq} events, the log holds {count}")
    if seq == count and recorded_hash != last:
        return Verdict(count, count, "does not match the hash the head file recorded for it")
    if seq == count - 1 and recorded_hash == before:
        return Verdict(count)  # a writer stopped between its (signed) line and the head
    if seq < count:
        return Verdict(count, seq + 1, f"the head records {seq} events, the log holds {count}: the head is stale")
    return Verdict(count)


def events(log: str | Path) -> Iterator[dict[str, Any]]:
    """Every event of the log, in order (lines that are no event are skipped: `verify` reports them).

    No log yet is no events; a folder, a file that is not UTF-8 text, or an emptied log is a StewardError.
    """
    log = Path(log)
    if not log.exists():
        return
    _check_is_log(log)
    if log.stat().st_size == 0:
        raise StewardError(f"{log}: {EMPTY}")
    with log.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                entry = json.loads(_text(raw, log, number))
            except ValueError:
                continue
            if isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("time", "who", "event")):
                yield entry


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
