"""Autoscaling: a pure decision over a pool's recent load samples.

The controller samples each autoscaled pool on every tick and asks `decide` how many
replicas it should have. Nothing here touches Ray, the router or the clock: the same
trace always gives the same decisions, which is what the unit tests replay.

Design note (why it does not flap):
- A sample's recommendation is `ceil(replicas * value / target)` (the metric's value
  per replica against its target), clamped to [min_replicas, max_replicas]; inside a
  tolerance band around the target it recommends the current size.
- Scaling up follows the newest recommendation, at most once per `up_cooldown_s`.
- Scaling down follows the *largest* recommendation of the whole `down_window_s`, so
  one quiet sample cannot shrink a pool that was busy a moment ago; it also waits
  `down_cooldown_s` after any change, and needs samples covering the full window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

METRICS = ("queue_depth", "kv_usage", "ttft_p90")


@dataclass(frozen=True)
class Policy:
    min_replicas: int
    max_replicas: int
    metric: str  # one of METRICS
    target: float  # per replica: queued requests, KV fraction used, or TTFT p90 seconds
    tolerance: float = 0.1
    up_cooldown_s: float = 5.0
    down_cooldown_s: float = 30.0
    down_window_s: float = 30.0


@dataclass(frozen=True)
class Sample:
    t: float  # seconds, any monotonic clock
    value: float  # the policy's metric, per replica (mean over the pool's ready workers)
    replicas: int  # ready replicas when it was taken


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str

    def changes(self, current: int) -> bool:
        return self.replicas != current


def recommend(policy: Policy, s: Sample) -> int:
    """Replicas this one sample asks for, within the policy's bounds."""
    n = max(s.replicas, 1)
    ratio = s.value / policy.target
    if abs(ratio - 1.0) <= policy.tolerance:
        want = s.replicas
    else:
        want = math.ceil(n * ratio - 1e-9)
    return min(policy.max_replicas, max(policy.min_replicas, want))


def decide(policy: Policy, samples: list[Sample], current: int, last_change_t: float | None,
           now: float) -> Decision:
    """How many replicas the pool should have now. `samples` are oldest first."""
    if current < policy.min_replicas or current > policy.max_replicas:
        n = min(policy.max_replicas, max(policy.min_replicas, current))
        return Decision(n, f"keep within [{policy.min_replicas}, {policy.max_replicas}]")
    if not samples:
        return Decision(current, "no samples yet")
    since = math.inf if last_change_t is None else now - last_change_t
    latest = samples[-1]
    up = recommend(policy, latest)
    if up > current:
        if since < policy.up_cooldown_s:
            return Decision(current, f"scale-up to {up} held: cool-down ({since:.1f}s < {policy.up_cooldown_s:g}s)")
        return Decision(up, f"{policy.metric} {latest.value:.3g} > target {policy.target:g}: {current} -> {up}")
    window = [s for s in samples if s.t >= now - policy.down_window_s]
    down = max(recommend(policy, s) for s in window) if window else current
    if down >= current:
        return Decision(current, f"{policy.metric} {latest.value:.3g} at target {policy.target:g}")
    if samples[0].t > now - policy.down_window_s:
        return Decision(current, f"scale-down to {down} held: window not yet {policy.down_window_s:g}s")
    if since < policy.down_cooldown_s:
        return Decision(current, f"scale-down to {down} held: cool-down ({since:.1f}s < {policy.down_cooldown_s:g}s)")
    return Decision(down, f"{policy.metric} at most {policy.target:g} for {policy.down_window_s:g}s: "
                          f"{current} -> {down}")


def prune(samples: list[Sample], now: float, keep_s: float) -> list[Sample]:
    """Drop samples older than `keep_s`, but keep the newest older one so the window stays covered."""
    old = [s for s in samples if s.t < now - keep_s]
    return old[-1:] + [s for s in samples if s.t >= now - keep_s]
