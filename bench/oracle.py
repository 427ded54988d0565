"""The oracle: what a router that knew the processors' schedule in advance would have earned.

bench/rinha.js counts, per second of the test, the payments the backend answered 2xx and their
amount in whole cents. oracle() takes those counts, the schedule (bench/phases/*.json), the
processors' fees and the moment the teardown read the summaries, and computes the profit
(amount − fee) of the best routing of exactly those payments:

- A payment accepted in second k may be forwarded at any time from second k on.
- A processor stores a payment sent at time t iff it is not failing at t + d, where d is the
  delay configured at t (the processor sleeps first, then checks for failure: CONTEST.md),
  and t + d is before the teardown read the summaries (later, it would not be counted).
- A processor is usable only while its delay keeps the summary's promise (d < PROMISE_MARGIN_S,
  the consistency check's 1.5 s): a slower one stores payments inside windows already checked,
  and the fine (35 %) costs more than any fee.
- Capacity: a processor with delay d > 0 completes at most PROCESSOR_MAX_IN_FLIGHT / d payments
  per second (800 in flight; the waiting line adds no throughput); with no delay, its capacity
  is taken as unlimited (the emulator answers at once; the real one takes about a millisecond).
- Each second's payments are treated as one block of the same average amount (a fluid model,
  one-second resolution): this is exact while no capacity binds, and otherwise ignores that
  the best router would give the default's scarce slots to the largest amounts.
- Routing: every payment that can reach the default goes there (fee 5 %), else the fallback
  (15 %), else it earns nothing. Where capacity binds, each processor's capacity, latest
  second first, goes to the latest-accepted payments that may use it (earlier payments have
  every option later ones have, so serving the latest first leaves the most choice), the
  default's capacity before the fallback's.

The run's own profit is what the contest computes: the backend's reported gross minus fees
(no p99 bonus, no fine); its share is profit / oracle.
"""
from __future__ import annotations

import math

PROCESSOR_MAX_IN_FLIGHT = 800  # CONTEST.md: the processor's POST /payments in flight
PROMISE_MARGIN_S = 1.5  # the consistency check's window ends this long before it asks
PROCESSORS = ("default", "fallback")


def _state_at(schedule, t, processor):
    """(delay_s, failing) of a processor at time t (seconds since the scenarios started).

    Before the first phase the processors are healthy with no delay (as a fresh emulator, or
    the previous teardown, left them)."""
    current = {"delay": 0, "failure": False}
    for phase in schedule:
        if phase["at_s"] <= t:
            current = phase.get(processor) or {}
        else:
            break
    return (current.get("delay") or 0) / 1000.0, bool(current.get("failure"))


def _breakpoints(schedule, end_s):
    """Times in [0, end_s] at which some processor's state changes, with 0 and end_s."""
    points = {0.0, float(end_s)}
    points.update(float(p["at_s"]) for p in schedule if 0 < p["at_s"] < end_s)
    return sorted(points)


def good_send_pieces(schedule, processor, start, stop, end_s):
    """[(seconds, delay_s)]: the parts of [start, stop) at which a payment sent to `processor`
    would be stored before end_s (not failing once its delay has elapsed, and done by end_s),
    with the delay in force when it is sent."""
    points = [start] + [p for p in _breakpoints(schedule, end_s) if start < p < stop] + [stop]
    pieces = []
    for a, b in zip(points, points[1:]):
        if b <= a:
            continue
        delay, _ = _state_at(schedule, a, processor)
        if delay >= PROMISE_MARGIN_S:
            continue  # its stores would land inside windows already checked
        # Within [a, b) the delay is constant and a payment lands at t + delay: split [a, b)
        # where t + delay crosses a change of state, and keep the pieces that land healthy.
        last_send = min(b, end_s - delay)
        cuts = [a] + [p - delay for p in _breakpoints(schedule, end_s) if a < p - delay < last_send] + [last_send]
        for u, v in zip(cuts, cuts[1:]):
            if v > u and not _state_at(schedule, u + delay, processor)[1]:
                pieces.append((v - u, delay))
    return pieces


def capacities(schedule, slots, end_s):
    """{processor: [payments it can store from sends in second k, for each slot k]} (inf:
    unlimited)."""
    out = {}
    for processor in PROCESSORS:
        caps = []
        for k in range(slots):
            start, stop = float(k), min(float(k + 1), end_s)
            cap = 0.0
            if stop > start:
                for seconds, delay in good_send_pieces(schedule, processor, start, stop, end_s):
                    cap += math.inf if delay <= 0 else seconds * PROCESSOR_MAX_IN_FLIGHT / delay
            caps.append(cap)
        out[processor] = caps
    return out


def _assign(supply, caps):
    """Route as many payments as the capacity allows, latest capacity to latest payments.

    supply: payments left per slot (changed in place). caps: capacity per slot. Returns the
    payments routed per slot of acceptance."""
    routed = [0.0] * len(supply)
    for j in range(len(caps) - 1, -1, -1):
        room = caps[j]
        for i in range(j, -1, -1):
            if room <= 0:
                break
            take = min(room, supply[i])
            if take > 0:
                supply[i] -= take
                routed[i] += take
                room -= take
    return routed


def oracle(accepted_by_sec, cents_by_sec, schedule, fee_rates, end_s):
    """The best profit (in currency units) from these accepted payments, with its parts.

    accepted_by_sec / cents_by_sec: payments answered 2xx in each second since the scenarios
    started, and their amounts in cents. schedule: the phases (at_s, default/fallback delay in
    ms and failure). fee_rates: {"default": 0.05, "fallback": 0.15}. end_s: when the teardown
    read the summaries, in seconds since the scenarios started."""
    slots = len(accepted_by_sec)
    schedule = sorted(schedule, key=lambda p: p["at_s"])
    caps = capacities(schedule, slots, end_s)
    supply = [float(n) for n in accepted_by_sec]
    value = [c / n if n else 0.0 for n, c in zip(accepted_by_sec, cents_by_sec)]  # cents per payment
    profit_cents = 0.0
    parts = {}
    for processor in PROCESSORS:
        routed = _assign(supply, caps[processor])
        cents = sum(r * v for r, v in zip(routed, value))
        profit_cents += cents * (1 - fee_rates[processor])
        parts[processor] = {"payments": round(sum(routed), 1), "amount": round(cents / 100, 2)}
    lost = sum(supply)
    parts["unroutable"] = {"payments": round(lost, 1),
                           "amount": round(sum(s * v for s, v in zip(supply, value)) / 100, 2)}
    return {"profit": round(profit_cents / 100, 2), "routing": parts}


def oracle_for_result(result):
    """The oracle and the run's share of it, from bench/rinha.js's result.json; None when the
    run did not record what the oracle needs (no teardown, or an older script)."""
    needed = ("accepted_by_sec", "accepted_cents_by_sec", "schedule", "fee_rates",
              "scenario_start_epoch_ms", "teardown_epoch_ms")
    if not result.get("teardown_ok") or any(result.get(key) is None for key in needed):
        return None
    end_s = (result["teardown_epoch_ms"] - result["scenario_start_epoch_ms"]) / 1000.0
    # rinha.js applies only the phases that start before DURATION_S.
    schedule = [p for p in result["schedule"] if p["at_s"] < result["duration_s"]]
    out = oracle(result["accepted_by_sec"], result["accepted_cents_by_sec"], schedule,
                 result["fee_rates"], end_s)
    out["end_s"] = round(end_s, 3)
    out["run_profit"] = result["net"]
    out["share"] = result["net"] / out["profit"] if out["profit"] > 0 else None
    return out


def oracle_line(result):
    """'oracle 354,639.83, share 97.3 %' (or why there is none)."""
    data = result.get("oracle")
    if not data:
        return "oracle: not computed (the teardown failed or the run lacks per-second counts)"
    share = "-" if data["share"] is None else f"{data['share'] * 100:.1f} %"
    routing = data["routing"]
    return (f"oracle {data['profit']:,.2f}, share {share}  (the oracle's routing: default "
            f"{routing['default']['payments']:,.0f}, fallback {routing['fallback']['payments']:,.0f}, "
            f"unroutable {routing['unroutable']['payments']:,.0f})")
