"""The package's declared floors hold: ``python_requires`` admits only Pythons that can
run every module (syntax and standard-library modules)."""

from __future__ import annotations

import ast
import configparser
import pathlib
import sys

from twisted.trial.unittest import SynchronousTestCase

ROOT = pathlib.Path(__file__).resolve().parent.parent

#: standard-library modules newer than 3.10, with the version that added them
NEW_STDLIB = {"tomllib": (3, 11)}


def floor() -> tuple[int, int]:
    """The ``python_requires`` floor from setup.cfg."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    spec = cfg["options"]["python_requires"].strip()
    assert spec.startswith(">="), spec
    major, minor = spec[2:].split(".")[:2]
    return int(major), int(minor)


class FloorTests(SynchronousTestCase):
    """python_requires is honest."""

    def test_every_module_parses_at_the_floor(self) -> None:
        version = floor()
        files = sorted((ROOT / "dockerspaces").rglob("*.py"))
        self.assertGreater(len(files), 20)
        for path in files:
            ast.parse(path.read_text(encoding="utf-8"), str(path), feature_version=version)

    def test_stdlib_modules_exist_at_the_floor(self) -> None:
        version = floor()
        for path in sorted((ROOT / "dockerspaces").rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                for name in names:
                    need = NEW_STDLIB.get(name.split(".")[0])
                    if need is not None:
                        self.assertGreaterEqual(version, need, f"{path} imports {name}")

    def test_running_python_meets_the_floor(self) -> None:
        self.assertGreaterEqual(sys.version_info[:2], floor())
