"""Adoption (dockerspaces.engine.adopt): list_own's label filters, and never someone
else's container."""

from __future__ import annotations

from typing import Any

from dockerspaces.engine.interface import LABEL_HOST, LABEL_INSTANCE, LABEL_SLOT, LABEL_SPEC

from .test_engine_harness import SPEC, EngineTestCase


class ListOwnTests(EngineTestCase):
    """list_own(): label filters, and never someone else's container."""

    def entry(
        self, cid: str, instance: str, host: str, spec: str = SPEC.segment(), state: str = "running"
    ) -> dict[str, Any]:
        return {
            "Id": cid,
            "Names": [f"/ds-{cid}"],
            "State": state,
            "Labels": {
                LABEL_INSTANCE: instance,
                LABEL_HOST: host,
                LABEL_SLOT: "9101",
                LABEL_SPEC: spec,
            },
        }

    def test_filters_and_mapping(self) -> None:
        eng = self.make()
        self.client.listing = [
            self.entry("a1", "inst1", "local"),
            self.entry("b2", "inst1", "local", spec="garbage::", state="exited"),
            self.entry("c3", "other", "local"),
            self.entry("d4", "inst1", "remote"),
        ]
        got = self.successResultOf(eng.list_own())
        self.assertEqual(
            self.client.calls[-1],
            ("containers", (True, {"label": ["dockerspaces.instance=inst1", "dockerspaces.host=local"]})),
        )
        self.assertEqual([c.id for c in got], ["a1", "b2"])
        self.assertEqual(got[0].spec, SPEC)
        self.assertEqual((got[0].name, got[0].running, got[0].slot_port), ("ds-a1", True, 9101))
        self.assertIsNone(got[1].spec)
        self.assertFalse(got[1].running)
