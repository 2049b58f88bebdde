"""Late labels at a replica: request ids that only this deployment can issue, and a rate limit on /feedback.

A request id is a random part and a keyed hash of it (the key is the deployment's, kept by its monitor), so any
replica can tell an id this deployment issued from a made-up one without asking anyone: a label for an id nobody
was given, or for a prediction yet to be made, is refused on the spot.
"""

import hashlib
import hmac
import math
import os
import time

RANDOM_HEX, MAC_BYTES = 32, 8
REQUEST_ID_LENGTH = RANDOM_HEX + 2 * MAC_BYTES


class RequestIds:
    """Issues and recognises the deployment's request ids."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    def issue(self, count: int) -> list[str]:
        return [self._signed(os.urandom(RANDOM_HEX // 2).hex()) for _ in range(count)]

    def issued(self, request_id: str) -> bool:
        if len(request_id) != REQUEST_ID_LENGTH:
            return False
        return hmac.compare_digest(self._signed(request_id[:RANDOM_HEX]), request_id)

    def _signed(self, random_part: str) -> str:
        mac = hashlib.blake2b(random_part.encode(), key=self.key, digest_size=MAC_BYTES).hexdigest()
        return random_part + mac


class RateLimit:
    """At most `rate` events a second on average, in bursts of up to a second's worth (a token bucket)."""

    def __init__(self, rate: float) -> None:
        self.rate, self.capacity = rate, max(rate, 1.0)
        self.tokens, self.at = self.capacity, time.monotonic()

    def wait(self) -> int:
        """0 if an event may happen now (and it is counted), else the whole seconds until one may."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0
        return max(1, math.ceil((1 - self.tokens) / self.rate))
