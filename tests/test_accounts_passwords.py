"""scrypt password hashes: round trip, salt, malformed encodings, memory-hard defaults."""

from __future__ import annotations

import base64
import inspect

from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.accounts import passwords
from dockerspaces.accounts.passwords import hash_password, verify_password

FAST = 2**10  # the tests' cost; the defaults are tested on their own


class PasswordTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        encoded = hash_password("correct horse", n=FAST)
        self.assertTrue(verify_password("correct horse", encoded))
        self.assertNotIn("correct", encoded)
        scheme, n, r, p, salt, key = encoded.split("$")
        self.assertEqual((scheme, n, r, p), ("scrypt", str(FAST), "8", "1"))
        self.assertEqual(len(base64.b64decode(salt)), 16)
        self.assertEqual(len(base64.b64decode(key)), 32)

    def test_other_parameters_verify_with_their_own(self) -> None:
        encoded = hash_password("pw", n=2**8, r=4, p=2)
        self.assertEqual(encoded.split("$")[1:4], ["256", "4", "2"])
        self.assertTrue(verify_password("pw", encoded))
        self.assertFalse(verify_password("pW", encoded))

    def test_wrong_passwords(self) -> None:
        encoded = hash_password("correct horse", n=FAST)
        for wrong in ("correct horsE", "correct horse ", "", "correct"):
            self.assertFalse(verify_password(wrong, encoded), wrong)
        self.assertFalse(verify_password("\ud800", encoded))  # cannot even be encoded

    def test_two_hashes_of_one_password_differ(self) -> None:
        a, b = hash_password("pw", n=FAST), hash_password("pw", n=FAST)
        self.assertNotEqual(a, b)
        self.assertNotEqual(a.split("$")[4], b.split("$")[4])  # the salt
        self.assertTrue(verify_password("pw", a))
        self.assertTrue(verify_password("pw", b))

    def test_malformed_encodings_are_false(self) -> None:
        good = hash_password("pw", n=FAST)
        _, n, r, p, salt, key = good.split("$")
        short_key = base64.b64encode(base64.b64decode(key)[:16]).decode()
        for bad in (
            "",
            "plain",
            "$$$$$",
            "scrypt$1$2$3",
            good + "$extra",
            f"bcrypt${n}${r}${p}${salt}${key}",
            f"scrypt$1000${r}${p}${salt}${key}",  # n not a power of two
            f"scrypt$1${r}${p}${salt}${key}",
            f"scrypt${2**30}${r}${p}${salt}${key}",  # gigabytes: refused, not tried
            f"scrypt${n}$0${p}${salt}${key}",
            f"scrypt${n}${r}$-1${salt}${key}",
            f"scrypt${n}${r}${p}$!!!${key}",
            f"scrypt${n}${r}${p}${salt}$!!!",
            f"scrypt${n}${r}${p}$${key}",  # no salt
            f"scrypt${n}${r}${p}${salt}${short_key}",
            f"scrypt$x${r}${p}${salt}${key}",
            f"scrypt${n}$ 8${p}${salt}$",
        ):
            self.assertFalse(verify_password("pw", bad), bad)

    def test_defaults_are_memory_hard(self) -> None:
        default_n = inspect.signature(hash_password).parameters["n"].default
        self.assertGreaterEqual(default_n, 2**15)
        self.assertEqual(default_n, passwords.DEFAULT_N)
        encoded = hash_password("pw")
        _, n, r, _, _, _ = encoded.split("$")
        self.assertGreaterEqual(128 * int(n) * int(r), 32 * 2**20)  # 32 MiB per check
        self.assertTrue(verify_password("pw", encoded))
