"""Unit tests for the protocols between backend, exchange and tunnel
(dockerspaces/web/sink.py): that they keep the web package free of import circles."""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import dockerspaces.web

WEB = Path(dockerspaces.web.__file__).parent


def web_imports() -> dict[str, set[str]]:
    """Each module of dockerspaces.web and the modules of the package it imports
    (anywhere in it: at the top, for type checking only, or inside a function)."""
    modules = {p.stem for p in WEB.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name in modules:
        deps: set[str] = set()
        for node in ast.walk(ast.parse((WEB / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module is not None:
                    deps.add(node.module.split(".")[0])
                else:
                    deps.update(a.name for a in node.names)
            elif (
                isinstance(node, ast.ImportFrom)
                and node.module is not None
                and (node.module.startswith("dockerspaces.web."))
            ):
                deps.add(node.module.split(".")[2])
        graph[name] = (deps & modules) - {name}
    return graph


class ImportTests(SynchronousTestCase):
    def test_sink_imports_none_of_the_others(self) -> None:
        self.assertEqual(web_imports()["sink"], set())

    def test_no_import_circle(self) -> None:
        """No module of dockerspaces.web reaches itself through its imports."""
        graph = web_imports()
        for start in graph:
            seen: set[str] = set()
            todo = list(graph[start])
            while todo:
                m = todo.pop()
                self.assertNotEqual(m, start, f"{start} imports itself through {sorted(seen)}")
                if m not in seen:
                    seen.add(m)
                    todo.extend(graph[m])

    def test_backend_and_tunnel_do_not_import_the_proxy(self) -> None:
        graph = web_imports()
        self.assertNotIn("proxy", graph["backend"] | graph["tunnel"])
        self.assertNotIn("tunnel", graph["backend"])
        self.assertNotIn("backend", graph["headers"] | graph["tunnel"])
