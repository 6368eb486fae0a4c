"""Run the fault-injection scenario (tests/integration/faults.py) once and print its
table: ``python bench/faults.py [--requests N] [--clients C]``. Needs a Docker engine
and the test images (built on demand). Used for RELIABILITY.md's before/after runs:
run it from a checkout of the commit to measure (with that checkout on PYTHONPATH)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.integration import faults
from tests.integration.images import SLOWHTTP, TTS, WEB, ensure_test_images
from tests.integration.procs import Server


def main() -> None:
    """Parse the arguments, run the scenario, print the table and the bars missed."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--kill-every", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--title", default="fault injection")
    ap.add_argument(
        "--details", action="store_true", help="one line per request that did not end ok (or hung up)"
    )
    args = ap.parse_args()
    ensure_test_images(TTS, WEB, SLOWHTTP)
    srv = Server("--queue-timeout", "240", "--start-timeout", "60", slots=2)
    # not under _trial_temp: a test run started meanwhile would delete it
    srv.log_path = os.path.join(tempfile.mkdtemp(prefix="ds-faults-"), "server.log")
    srv.start()
    try:
        report = faults.run(
            srv, requests=args.requests, clients=args.clients, kill_every=args.kill_every, seed=args.seed
        )
    finally:
        srv.cleanup()
    print(report.table(args.title))  # ends with the bars missed, if any
    if args.details:
        for o in report.outcomes:
            if o.klass not in ("ok", "gone"):
                fwd = "forwarded" if o.id in report.forwarded else "never forwarded"
                print(f"#{o.id} {o.kind} {o.klass} ({fwd}) {o.detail[:100]!r}")


if __name__ == "__main__":
    main()
