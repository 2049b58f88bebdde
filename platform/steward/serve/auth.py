"""API keys: read from an environment variable or a file (never the spec), compared in constant time, never logged."""

import hmac
import os
from collections.abc import Mapping
from pathlib import Path

from steward.errors import StewardError
from steward.spec.serve import AuthSpec


class AuthConfigError(StewardError):
    """The auth section points at keys that are not there; the message names the field, never a key."""


def load_keys(auth: AuthSpec | None) -> list[bytes]:
    """The accepted API keys ([] means auth is off). Raises AuthConfigError when the source is empty or missing."""
    if auth is None:
        return []
    if auth.api_keys_env is not None:
        raw, where = os.environ.get(auth.api_keys_env, ""), f"serve.auth.api_keys_env: ${auth.api_keys_env}"
        keys = [k.strip() for k in raw.split(",")]
    else:
        path = Path(auth.api_keys_file or "").expanduser()
        where = f"serve.auth.api_keys_file: {path}"
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise AuthConfigError(f"{where} cannot be read ({type(err).__name__})") from None
        keys = [line.split("#", 1)[0].strip() for line in lines]
    keys = [k for k in keys if k]
    if not keys:
        raise AuthConfigError(f"{where} holds no API key; set at least one (the deployment refuses to run open)")
    return [k.encode() for k in keys]


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request presents: `Authorization: Bearer <key>` or `X-API-Key: <key>`."""
    bearer = headers.get("authorization") or ""
    scheme, _, token = bearer.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key")


def key_is_valid(presented: str | None, keys: list[bytes]) -> bool:
    """True when `presented` equals one of `keys`; every key is compared, each in constant time."""
    if not keys:
        return True
    candidate = (presented or "").encode()
    matched = False
    for key in keys:  # no early exit: the time taken does not say which key (or whether any) matched
        matched |= hmac.compare_digest(candidate, key)
    return matched and bool(presented)
