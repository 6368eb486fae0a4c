"""The scale-out rule for x: keys, as pure functions (see ``docs/broker.md``).

Another container of a key is started only while

* its waiters outnumber its starting containers (``waiting > starting``), and
* the expected wait of the last waiter for a busy container exceeds a cold start:
  ``ceil((waiting - starting) / (busy + starting)) * service > cold``.

``service`` is the larger of the key's EWMA of completed service times and the mean
age of its requests in flight (so a key whose requests turn out to be long scales
even before the first one finished); with no measurement it is that mean age alone,
i.e. requests are assumed short until shown otherwise.  ``cold`` is the key's EWMA of
measured cold starts (create to ready), :data:`DEFAULT_COLD_START` before any.  With
nothing busy and nothing starting a container is always started.
"""

from __future__ import annotations

import math

from attrs import define

#: Cold-start estimate (seconds) before a key's first measured start.
DEFAULT_COLD_START = 30.0
#: Weight of a new sample in the moving averages.
EWMA_ALPHA = 0.3


@define
class Ewma:
    """Exponentially weighted moving average; ``value`` is None until the first sample."""

    value: float | None = None
    samples: int = 0

    def add(self, sample: float, alpha: float = EWMA_ALPHA) -> None:
        """Fold one measurement in (the first one is taken as is)."""
        sample = max(0.0, sample)
        self.value = sample if self.value is None else self.value + alpha * (sample - self.value)
        self.samples += 1


def service_estimate(ewma: float | None, mean_age: float) -> float:
    """Expected service time of one request: max(EWMA, mean age of those in flight)."""
    return max(ewma or 0.0, mean_age)


def expected_wait(waiting: int, starting: int, busy: int, service: float) -> float:
    """Expected wait of the last waiter not covered by a starting container."""
    uncovered = waiting - starting
    if uncovered <= 0:
        return 0.0
    servers = busy + starting
    if servers <= 0:
        return math.inf
    return math.ceil(uncovered / servers) * service


def wants_more(waiting: int, starting: int, busy: int, service: float, cold: float) -> bool:
    """True when one more container of the key should be started (the rule above)."""
    if waiting <= starting:
        return False
    return expected_wait(waiting, starting, busy, service) > cold


def time_to_scale(
    waiting: int,
    starting: int,
    busy: int,
    ewma: float | None,
    age_sum_base: float,
    cold: float,
) -> float | None:
    """Absolute time at which the rule would start to want one more container.

    The mean age of in-flight requests grows with time: at time ``t`` it is
    ``t - age_sum_base`` where ``age_sum_base`` is the mean start time of those
    requests.  Returns None when waiting longer cannot change the answer (nothing busy
    or nothing uncovered).
    """
    uncovered = waiting - starting
    servers = busy + starting
    if uncovered <= 0 or busy <= 0 or servers <= 0:
        return None
    factor = math.ceil(uncovered / servers)
    # want: factor * (t - base) > cold  ->  t > base + cold / factor
    return age_sum_base + cold / factor
