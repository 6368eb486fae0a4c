"""scrypt password hashes: round trip, salt, malformed encodings, memory-hard defaults."""

from __future__ import annotations

import inspect

from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.accounts import passwords
from dockerspaces.accounts.passwords import hash_password, verify_password


class PasswordTests(SynchronousTestCase):
    def test_round_trip_and_salt(self) -> None:
        a = hash_password("correct horse", n=2**10)
        b = hash_password("correct horse", n=2**10)
        self.assertNotEqual(a, b)
        self.assertTrue(verify_password("correct horse", a))
        self.assertTrue(verify_password("correct horse", b))
        self.assertFalse(verify_password("correct horsE", a))
        self.assertFalse(verify_password("", a))
        self.assertNotIn("correct", a)

    def test_malformed_encodings_are_false(self) -> None:
        good = hash_password("pw", n=2**10)
        _, n, r, p, salt, key = good.split("$")
        for bad in ("", "plain", "scrypt$1$2$3", f"bcrypt${n}${r}${p}${salt}${key}",
                    f"scrypt$1000${r}${p}${salt}${key}",  # n not a power of two
                    f"scrypt${2**30}${r}${p}${salt}${key}",  # absurd cost
                    f"scrypt${n}${r}${p}$!!!${key}", f"scrypt$x${r}${p}${salt}${key}"):
            self.assertFalse(verify_password("pw", bad), bad)

    def test_defaults_are_memory_hard(self) -> None:
        default_n = inspect.signature(hash_password).parameters["n"].default
        self.assertGreaterEqual(default_n, 2**15)
        self.assertEqual(default_n, passwords.DEFAULT_N)
        encoded = hash_password("pw")
        self.assertEqual(encoded.split("$")[1:3], [str(2**15), "8"])  # 32 MiB per check
        self.assertTrue(verify_password("pw", encoded))
