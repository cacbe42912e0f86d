"""Serving metrics: an in-process tally (``Tally``) and, in Serve, Ray's Prometheus metrics on top.

Exported (Prometheus names get Ray's ``ray_`` prefix; counters also a ``_total`` suffix):

- ``cscr_routed_requests{expert, mode}``: requests answered per expert; mode is ``routed``
  (the router chose) or ``direct`` (the client named the expert);
- ``cscr_fallbacks{expert}``: answers that came from a fallback expert;
- ``cscr_expert_failures{expert}``: expert calls that failed or timed out;
- ``cscr_expert_circuit_open{expert}`` (gauge): 1 while the breaker skips the expert (its circuit
  open, or half-open with one trial request), 0 once it answers again or leaves the pool; absent
  for an expert whose circuit never opened;
- ``cscr_cost_best_expert{unit}`` / ``cscr_cost_chosen{unit}``: estimated cost of the routed
  answers if the best expert had answered each of them, and of the experts that did answer;
- ``cscr_estimated_cost_saved{unit}`` (gauge): their difference, the estimated saving against
  always using the best expert (the pool's best by mean train quality);
- ``cscr_routing_ms`` (histogram): routing-decision time;
- ``cscr_pool_version`` (gauge, set by ``serve.deployments.PoolFollower``): the pool record
  version each Router and Ingress replica serves (a replica behind the others shows lower).

Costs are per-request estimates: the chosen expert's mean train cost per prompt in the run's
unit (USD or parameters), not the bill of the actual call.
"""

from __future__ import annotations

from collections import Counter as _Tally
from dataclasses import dataclass, field
from typing import Any

_LATENCY_BOUNDARIES_MS = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0]


@dataclass
class Tally:
    """The figures kept in memory (GET /healthz with the admin key shows them; tests read them).

    Also the metrics sink of a ``CompletionService`` run without Ray."""

    unit: str = "normalised"  # cost unit of the run (usd | params | normalised)
    routed: _Tally[str] = field(default_factory=_Tally)
    direct: _Tally[str] = field(default_factory=_Tally)
    fallbacks: int = 0
    failures: _Tally[str] = field(default_factory=_Tally)
    open_circuits: set[str] = field(default_factory=set)  # experts whose circuit is open or half-open
    cost_best: float = 0.0
    cost_chosen: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"routed": dict(self.routed), "direct": dict(self.direct), "fallbacks": self.fallbacks,
                "failures": dict(self.failures), "cost_unit": self.unit,
                "estimated_cost_best_expert": self.cost_best, "estimated_cost_chosen": self.cost_chosen,
                "estimated_cost_saved": self.cost_best - self.cost_chosen}

    def failure(self, expert: str) -> None:
        self.failures[expert] += 1

    def circuit(self, expert: str, is_open: bool) -> None:
        """The expert's circuit opened, or closed again (the breaker's ``on_change``)."""
        if is_open:
            self.open_circuits.add(expert)
        else:
            self.open_circuits.discard(expert)

    def answered(self, expert: str, routed: bool, fallback: bool, best_cost: float, chosen_cost: float,
                 routing_ms: float) -> None:
        (self.routed if routed else self.direct)[expert] += 1
        self.fallbacks += int(fallback)
        if routed:
            self.cost_best += best_cost
            self.cost_chosen += chosen_cost


class ServeMetrics(Tally):
    """The tally plus Ray Serve's Prometheus metrics (create inside the ingress replica)."""

    def __init__(self, unit: str = "normalised") -> None:
        from ray.serve import metrics

        super().__init__(unit=unit)
        self.routed_counter = metrics.Counter("cscr_routed_requests", "requests answered, per expert",
                                              tag_keys=("expert", "mode"))  # type: ignore[arg-type]  # Ray's stub says tuple[str]
        self.fallback_counter = metrics.Counter("cscr_fallbacks", "answers served by a fallback expert",
                                                tag_keys=("expert",))
        self.failure_counter = metrics.Counter("cscr_expert_failures",
                                               "expert calls that failed or timed out", tag_keys=("expert",))
        self.circuit_gauge = metrics.Gauge("cscr_expert_circuit_open",
                                           "1 while the breaker skips the expert (open or half-open)",
                                           tag_keys=("expert",))
        self.cost_best_counter = metrics.Counter("cscr_cost_best_expert",
                                                 "estimated cost had the best expert answered",
                                                 tag_keys=("unit",))
        self.cost_chosen_counter = metrics.Counter("cscr_cost_chosen",
                                                   "estimated cost of the answering experts", tag_keys=("unit",))
        self.saved = metrics.Gauge("cscr_estimated_cost_saved",
                                   "estimated cost saved against always using the best expert",
                                   tag_keys=("unit",))
        self.routing_ms = metrics.Histogram("cscr_routing_ms", "routing decision time (ms)",
                                            boundaries=_LATENCY_BOUNDARIES_MS)

    def failure(self, expert: str) -> None:
        super().failure(expert)
        self.failure_counter.inc(tags={"expert": expert})

    def circuit(self, expert: str, is_open: bool) -> None:
        super().circuit(expert, is_open)
        self.circuit_gauge.set(int(is_open), tags={"expert": expert})

    def answered(self, expert: str, routed: bool, fallback: bool, best_cost: float, chosen_cost: float,
                 routing_ms: float) -> None:
        super().answered(expert, routed, fallback, best_cost, chosen_cost, routing_ms)
        self.routed_counter.inc(tags={"expert": expert, "mode": "routed" if routed else "direct"})
        if fallback:
            self.fallback_counter.inc(tags={"expert": expert})
        if routed:
            tags = {"unit": self.unit}
            if best_cost > 0:  # Ray counters take only positive increments
                self.cost_best_counter.inc(float(best_cost), tags=tags)
            if chosen_cost > 0:
                self.cost_chosen_counter.inc(float(chosen_cost), tags=tags)
            self.saved.set(self.cost_best - self.cost_chosen, tags=tags)
            self.routing_ms.observe(float(routing_ms))
