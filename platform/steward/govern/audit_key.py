"""The audit key: a secret outside the log's folder that signs every event and the log's head (HMAC-SHA256).

The key is $STEWARD_AUDIT_KEY (the secret itself, at least 16 characters), else the file $STEWARD_AUDIT_KEY_FILE,
else `audit.key` in steward's config folder ($XDG_CONFIG_HOME/steward, default ~/.config/steward), made with 32
random bytes and mode 0600 the first time an event is recorded. A key file that others can read or write is
refused: whoever holds the key can forge events, so it must stay with the user (or the CI secret store).

Every writer of one log needs the same key: processes on one machine share the user's file; machines sharing a
log (an NFS folder, $STEWARD_AUDIT_LOG) need $STEWARD_AUDIT_KEY set alike on each.
"""

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from steward.errors import StewardError

ENV_KEY = "STEWARD_AUDIT_KEY"
ENV_KEY_FILE = "STEWARD_AUDIT_KEY_FILE"
KEY_NAME = "audit.key"
MIN_KEY_CHARS = 16


def config_dir() -> Path:
    """steward's per-user configuration folder: $XDG_CONFIG_HOME/steward, default ~/.config/steward."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "steward"


def key_file() -> Path:
    return Path(os.environ.get(ENV_KEY_FILE) or config_dir() / KEY_NAME)


def load_key(create: bool = False) -> bytes:
    """The audit key; with `create`, a new key file when there is none (recording), else StewardError (verifying)."""
    secret = os.environ.get(ENV_KEY)
    if secret is not None:
        if len(secret) < MIN_KEY_CHARS:
            raise StewardError(f"${ENV_KEY} is shorter than {MIN_KEY_CHARS} characters; set a longer random secret")
        return secret.encode()
    path = key_file()
    if not path.exists():
        if not create:
            raise StewardError(
                f"no audit key at {path}: events are signed with the key of the user who wrote them; verify as that "
                f"user, or set ${ENV_KEY} (or ${ENV_KEY_FILE}) to the key that wrote the log"
            )
        _create(path)
    return _read(path)


def _create(path: Path) -> None:
    """A new random key, published under its name in one step so that two first writers agree on one key."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_hex(32).encode() + b"\n")
    finally:
        os.close(fd)
    try:
        os.link(partial, path)  # fails when another process made the key first: theirs is kept
    except FileExistsError:
        pass
    finally:
        partial.unlink()


def _read(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
        secret = path.read_bytes().strip()
    except OSError as err:
        raise StewardError(f"{path}: cannot read the audit key ({err.strerror}); give a readable key file") from None
    if mode & 0o077:
        raise StewardError(
            f"{path}: the audit key is open to other users (mode {oct(mode & 0o777)}); run `chmod 600 {path}`"
        )
    if len(secret) < MIN_KEY_CHARS:
        raise StewardError(f"{path}: the audit key is empty or too short; delete it to have a new one made")
    return secret


def key_id(key: bytes) -> str:
    """A short public name of the key, so a log signed with another key says so (it reveals nothing of the key)."""
    return hashlib.sha256(b"steward-audit-key-id:" + key).hexdigest()[:16]


def sign(key: bytes, kind: str, *parts: object) -> str:
    """HMAC-SHA256 of `kind:part:part...`; `kind` keeps an event's signature from passing as a head's."""
    message = ":".join([kind, *map(str, parts)]).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def signed(key: bytes, signature: object, kind: str, *parts: object) -> bool:
    return isinstance(signature, str) and hmac.compare_digest(signature, sign(key, kind, *parts))
