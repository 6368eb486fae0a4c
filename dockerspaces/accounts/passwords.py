"""Password hashing with the standard library's scrypt (memory-hard; no dependency).

Encoding: ``scrypt$<n>$<r>$<p>$<salt, base64>$<key, base64>``. Every new hash uses the
defaults (n = 2**15, r = 8: 32 MiB and about a tenth of a second per check); a stored
hash keeps its own parameters, so raising them later needs no migration.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

#: scrypt's cost (memory and time: 128 * n * r bytes) for every new hash
DEFAULT_N = 2**15
DEFAULT_R = 8
SALT_BYTES = 16
KEY_BYTES = 32
#: the most memory a stored encoding may make one check use (malformed ones cannot
#: make the server allocate gigabytes)
MAX_MEMORY = 2**28


def _memory(n: int, r: int, p: int) -> int:
    """What OpenSSL's scrypt allocates for these parameters (its ``maxmem`` check)."""
    return 128 * r * (n + p + 2)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_memory(n, r, p) + (1 << 20), dklen=KEY_BYTES
    )


def hash_password(password: str, *, n: int = DEFAULT_N, r: int = DEFAULT_R, p: int = 1) -> str:
    """A new salted scrypt hash of ``password`` in the encoding above."""
    salt = os.urandom(SALT_BYTES)
    key = _scrypt(password, salt, n, r, p)
    return "$".join(
        ("scrypt", str(n), str(r), str(p), base64.b64encode(salt).decode(), base64.b64encode(key).decode())
    )


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches ``encoded`` (a constant-time compare); False for any
    malformed encoding or absurd parameters, never an exception."""
    try:
        scheme, n_text, r_text, p_text, salt_text, key_text = encoded.split("$")
        n, r, p = int(n_text), int(r_text), int(p_text)
        salt = base64.b64decode(salt_text, validate=True)
        expected = base64.b64decode(key_text, validate=True)
    except (ValueError, TypeError, AttributeError, binascii.Error):
        return False
    if scheme != "scrypt" or not _sane(n, r, p) or not salt or len(expected) != KEY_BYTES:
        return False
    try:
        got = _scrypt(password, salt, n, r, p)
    except (ValueError, MemoryError):  # a password that cannot be encoded (lone surrogates)
        return False
    return hmac.compare_digest(got, expected)


def _sane(n: int, r: int, p: int) -> bool:
    """scrypt's rules (n a power of two above 1) and bounded memory and time."""
    return n > 1 and n & (n - 1) == 0 and 1 <= r <= 64 and 1 <= p <= 16 and _memory(n, r, p) <= MAX_MEMORY
