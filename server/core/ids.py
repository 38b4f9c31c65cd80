"""Prefixed, time-sortable resource ids (`agent_…`, `env_…`, `sesn_…`, `sevt_…`, `file_…`)."""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_WIDTH = 22  # 128 bits in base 62


def new_id(prefix: str) -> str:
    """Return `<prefix>_<22 base-62 chars>`: 48 bits of milliseconds, then 80 random bits.

    Ids made later sort after earlier ones (to the millisecond), like the hosted API's.
    """
    value = (int(time.time() * 1000) << 80) | secrets.randbits(80)
    chars = []
    for _ in range(_WIDTH):
        value, digit = divmod(value, 62)
        chars.append(_ALPHABET[digit])
    return f"{prefix}_{''.join(reversed(chars))}"
