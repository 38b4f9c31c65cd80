"""Prefixed, time-sortable resource ids (`agent_…`, `env_…`, `sesn_…`, `sevt_…`, `file_…`)."""

from __future__ import annotations

import secrets
import threading
import time

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_WIDTH = 22  # 128 bits in base 62
_lock = threading.Lock()
_last = 0


def new_id(prefix: str) -> str:
    """Return `<prefix>_<22 base-62 chars>`: 48 bits of milliseconds, then 80 random bits.

    Ids made later sort after earlier ones, like the hosted API's; within one millisecond of
    one process the random part counts up, so list order is creation order.
    """
    global _last
    with _lock:
        value = (int(time.time() * 1000) << 80) | secrets.randbits(80)
        if value <= _last:
            value = _last + 1
        _last = value
    chars = []
    for _ in range(_WIDTH):
        value, digit = divmod(value, 62)
        chars.append(_ALPHABET[digit])
    return f"{prefix}_{''.join(reversed(chars))}"
