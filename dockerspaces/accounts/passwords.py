"""Password hashing with the standard library's scrypt (memory-hard; no dependency).

Encoding: ``scrypt$<n>$<r>$<p>$<salt, base64>$<key, base64>``; the defaults (n = 2**15,
r = 8: 32 MiB and some tens of milliseconds per check) are what every new hash uses,
old hashes keep their own parameters.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

DEFAULT_N = 2**15
KEY_BYTES = 32


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p,
                          maxmem=256 * n * r * p + (1 << 20), dklen=KEY_BYTES)


def hash_password(password: str, *, n: int = DEFAULT_N, r: int = 8, p: int = 1) -> str:
    """A new salted hash of ``password``."""
    salt = os.urandom(16)
    key = _scrypt(password, salt, n, r, p)
    return "$".join(("scrypt", str(n), str(r), str(p), base64.b64encode(salt).decode(),
                     base64.b64encode(key).decode()))


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches ``encoded`` (constant-time compare; False for any
    malformed encoding, never an exception)."""
    try:
        scheme, n, r, p, salt, key = encoded.split("$")
        if scheme != "scrypt":
            return False
        ni, ri, pi = int(n), int(r), int(p)
        if not (2 <= ni <= 2**20 and ni & (ni - 1) == 0 and 1 <= ri <= 32 and 1 <= pi <= 16):
            return False
        expected = base64.b64decode(key, validate=True)
        got = _scrypt(password, base64.b64decode(salt, validate=True), ni, ri, pi)
    except (ValueError, TypeError, MemoryError):
        return False
    return hmac.compare_digest(got, expected)
