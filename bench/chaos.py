#!/usr/bin/env python3
"""A seeded chaos run with exact-once accounting: `make chaos SEED=... [DURATION=...]`.

    python -m bench.chaos --seed 42 [--duration 180] [--rate 200] [--lb haproxy]

Starts the native stack (bench/arena.py: load balancer, two rinha.py instances, two
processor emulators, all on free ports, without cgroup limits), and for --duration
seconds drives POST /payments through the load balancer at a bounded rate (random
amounts with two decimals, a few correlationIds sent twice on purpose, as a client
retrying would: same id, same amount), while at seeded random times it

- changes an emulator's fault modes (bench/processor.py's PUT /admin/configurations/chaos:
  resets before/after storing, partial answers, stalls, 500/429, latency spikes), its
  failure flag and its delay;
- makes an emulator refuse connections for a while (PUT /admin/configurations/refuse:
  listeners closed, open connections closed; the process and its records stay);
- SIGKILLs or SIGTERMs an instance (the arena's supervisor restarts it), SIGSTOPs an
  instance or an emulator and SIGCONTs it a few seconds later.

Then it brings the stack to quiescence (every process continued, every fault cleared,
processors healthy, both instances' GET /health at queue 0, in_flight 0, pinned 0, within
QUIESCENCE_TIMEOUT_S) and proves, from the emulators' own records (GET /payments/{id} on
both, GET /admin/payments-summary) and the backend's GET /payments-summary:

1. every correlationId that got a 2xx is stored, in exactly one processor, with its amount;
2. no correlationId is stored in both processors;
3. nothing is stored whose every attempt was refused by the backend itself (a non-2xx answer
   from rinha.py, recognisable by its JSON body). Attempts without an answer, or with an
   error page from the load balancer (502/503/504: the instance may have taken the payment
   before it died or stopped), are "unknown": stored once or not at all, both allowed;
4. the processors hold nothing the client did not send (their counts equal the ids found);
5. the backend's summary equals each processor's totals, count and amount to the cent.

The seed comes first in the output so a failure can be replayed; the last line is the
verdict. The seed fixes the payments and the schedule of faults, not the thread timing, so
a replay reproduces the same faults at the same moments, not the same interleaving.
Importable: run(seed, duration_s, ...) returns a Verdict.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

from bench.arena import Arena, ArenaError
from bench.common import INSTANCES, OUT, http_request

DEFAULT_DURATION_S = 180.0     # length of the chaos (the load runs as long)
DEFAULT_RATE = 200             # payments offered per second
CLIENT_THREADS = 32            # client connections to the load balancer
CLIENT_TIMEOUT_S = 5.0         # a POST without an answer by then is "unknown"
DUPLICATE_FRACTION = 0.03      # payments that resend an earlier correlationId
MAX_AMOUNT_CENTS = 100_000     # amounts from 0.01 to 1000.00
EVENT_GAP_S = (0.3, 2.5)       # time between two chaos events, uniform
QUIET_EDGES_S = 2.0            # no events in the first and last seconds of the chaos
SIGSTOP_S = (0.5, 4.0)         # how long a SIGSTOP lasts before its SIGCONT
REFUSE_MS = (500, 5000)        # how long an emulator refuses connections
QUIESCENCE_TIMEOUT_S = 120.0   # bound on the wait for empty queues after the chaos
ADMIN_TIMEOUT_S = 2.0          # one admin call to an emulator
ADMIN_PATIENCE_S = 8.0         # retries of an admin call (a refusing emulator comes back)
CHECK_THREADS = 8              # parallel GET /payments/{id} during the checks

PROCESSORS = ("default", "fallback")
PROCESSOR_CHILD = {"default": "processor-default", "fallback": "processor-fallback"}
EXCLUSIVE_FAULTS = ("reset_before", "error_500", "error_429", "reset_after", "partial", "stall")
# Event kinds and their weights.
EVENTS = {
    "faults": 3.0,           # new fault modes on an emulator (or none)
    "failure": 2.0,          # an emulator starts or stops failing
    "delay": 2.0,            # an emulator's delay changes
    "refuse": 1.0,           # an emulator refuses connections for a while
    "kill": 1.0,             # SIGKILL an instance
    "term": 1.0,             # SIGTERM an instance
    "stop": 1.0,             # SIGSTOP an instance, SIGCONT later
    "stop-processor": 0.5,   # SIGSTOP an emulator, SIGCONT later
}
# The backend sends most payments to the default processor: most faults go there.
PROCESSOR_WEIGHTS = (0.7, 0.3)
DELAYS_MS = (0, 0, 20, 100, 500, 2000)
STALLS_MS = (200, 1000, 3000, 12000)


# ---------------------------------------------------------------------------
# The plan: payments and events, all from the seed
# ---------------------------------------------------------------------------

def plan_payments(rng: random.Random, count: int):
    """[(correlationId, amount text)]; about DUPLICATE_FRACTION of them repeat an earlier one."""
    out = []
    for i in range(count):
        if i > 10 and rng.random() < DUPLICATE_FRACTION:
            out.append(out[rng.randrange(max(0, i - 2000), i)])
            continue
        cid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        cents = rng.randint(1, MAX_AMOUNT_CENTS)
        out.append((cid, "%d.%02d" % divmod(cents, 100)))
    return out


def random_faults(rng: random.Random) -> dict:
    """Settings for PUT /admin/configurations/chaos; {} (none) a quarter of the time."""
    if rng.random() < 0.25:
        return {}
    modes = {name: round(rng.uniform(0, 0.08), 3) for name in EXCLUSIVE_FAULTS if rng.random() < 0.5}
    if rng.random() < 0.5:
        modes["spike"] = round(rng.uniform(0, 0.3), 3)
        modes["spike_ms"] = rng.choice((50, 200, 800, 1500))
    if "stall" in modes:
        modes["stall_ms"] = rng.choice(STALLS_MS)
        modes["stall_close"] = round(rng.random(), 2)
    modes["seed"] = rng.getrandbits(31)
    return modes


def plan_events(rng: random.Random, duration_s: float):
    """[(seconds after the start, kind, target, argument)], in time order."""
    kinds, weights = zip(*EVENTS.items())
    events, at = [], QUIET_EDGES_S
    while True:
        at += rng.uniform(*EVENT_GAP_S)
        if at > duration_s - QUIET_EDGES_S:
            return events
        kind = rng.choices(kinds, weights)[0]
        processor, instance = rng.choices(PROCESSORS, PROCESSOR_WEIGHTS)[0], rng.choice(INSTANCES)
        if kind == "faults":
            events.append((at, kind, processor, random_faults(rng)))
        elif kind == "failure":
            events.append((at, kind, processor, rng.random() < 0.5))
        elif kind == "delay":
            events.append((at, kind, processor, rng.choice(DELAYS_MS)))
        elif kind == "refuse":
            events.append((at, kind, processor, rng.randint(*REFUSE_MS)))
        elif kind in ("kill", "term"):
            events.append((at, kind, instance, None))
        elif kind == "stop":
            events.append((at, kind, instance, round(rng.uniform(*SIGSTOP_S), 2)))
        else:
            events.append((at, "stop", PROCESSOR_CHILD[processor], round(rng.uniform(*SIGSTOP_S), 2)))


# ---------------------------------------------------------------------------
# The client: POST /payments through the load balancer, every outcome recorded
# ---------------------------------------------------------------------------

ACCEPTED, REFUSED, UNKNOWN = "accepted", "refused", "unknown"


class Client:
    """Sends the planned payments at `rate` per second from CLIENT_THREADS threads until
    `deadline`; attempts[cid] = [(seconds since start, outcome, detail)]."""

    def __init__(self, port, payments, rate, started, deadline):
        self.port, self.payments, self.rate = port, payments, rate
        self.started, self.deadline = started, deadline
        self.next = 0
        self.lock = threading.Lock()
        self.attempts = {}
        self.threads = [threading.Thread(target=self.loop, daemon=True, name=f"client-{i}")
                        for i in range(CLIENT_THREADS)]

    def start(self):
        for thread in self.threads:
            thread.start()

    def join(self):
        for thread in self.threads:
            thread.join()

    def take(self):
        with self.lock:
            index = self.next
            if index >= len(self.payments):
                return None, 0.0
            self.next += 1
        return self.payments[index], self.started + index / self.rate

    def loop(self):
        conn = None
        while True:
            payment, due = self.take()
            if payment is None or due >= self.deadline:
                break
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=CLIENT_TIMEOUT_S)
            cid, amount = payment
            sent = time.monotonic() - self.started
            outcome, detail = self.post(conn, cid, amount)
            if outcome != ACCEPTED or detail == "closed":
                conn.close()
                conn = None
            with self.lock:
                self.attempts.setdefault(cid, []).append((round(sent, 3), outcome, detail))
        if conn is not None:
            conn.close()

    @staticmethod
    def post(conn, cid, amount):
        body = '{"correlationId":"%s","amount":%s}' % (cid, amount)
        try:
            conn.request("POST", "/payments", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as error:
            return UNKNOWN, type(error).__name__
        status = response.status
        if 200 <= status < 300:
            return ACCEPTED, "closed" if response.will_close else status
        if (response.getheader("Content-Type") or "").startswith("application/json"):
            return REFUSED, status                    # the instance's own answer
        return UNKNOWN, f"{status} from the load balancer: {data[:60]!r}"


# ---------------------------------------------------------------------------
# Faults applied to the arena
# ---------------------------------------------------------------------------

class Chaos:
    """Applies the planned events to a running arena; remembers what must be undone."""

    def __init__(self, arena: Arena, say):
        self.arena, self.say = arena, say
        self.urls = {"default": arena.default_url, "fallback": arena.fallback_url}
        self.stopped = {}          # child name -> monotonic time of its SIGCONT
        self.busy_until = {}       # processor -> monotonic time its refusal ends
        self.applied = {kind: 0 for kind in EVENTS}
        self.skipped = 0

    def admin(self, processor, method, path, doc=None, patience=ADMIN_PATIENCE_S):
        """One admin call, retried while the emulator refuses or hangs; True when done."""
        deadline = time.monotonic() + patience
        headers = {"X-Rinha-Token": self.arena.token}
        while True:
            try:
                status, body = http_request(self.urls[processor], method, path, doc, headers,
                                            timeout=ADMIN_TIMEOUT_S)
                if 200 <= status < 300:
                    return True
                self.say(f"  {processor} {method} {path}: {status} {body[:100]!r}")
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)

    def unavailable(self, processor) -> bool:
        now = time.monotonic()
        return (self.stopped.get(PROCESSOR_CHILD[processor], 0) > now
                or self.busy_until.get(processor, 0) > now)

    def apply(self, at, kind, target, argument):
        self.resume_due()
        if target in PROCESSORS and self.unavailable(target):
            self.say(f"t={at:6.1f}s skip {kind} {target}: it is stopped or refusing")
            self.skipped += 1
            return
        child = self.arena.children.get(target)
        what = {"faults": lambda: f"fault modes {json.dumps(argument)}",
                "failure": lambda: f"failure {argument}",
                "delay": lambda: f"delay {argument} ms",
                "refuse": lambda: f"refuse connections {argument} ms",
                "kill": lambda: f"SIGKILL pid {child.pid}",
                "term": lambda: f"SIGTERM pid {child.pid}",
                "stop": lambda: f"SIGSTOP pid {child.pid} for {argument} s"}[kind]()
        self.say(f"t={at:6.1f}s {target}: {what}")
        if kind == "faults":
            done = self.admin(target, "PUT", "/admin/configurations/chaos", argument)
        elif kind == "failure":
            done = self.admin(target, "PUT", "/admin/configurations/failure", {"failure": argument})
        elif kind == "delay":
            done = self.admin(target, "PUT", "/admin/configurations/delay", {"delay": argument})
        elif kind == "refuse":
            done = self.admin(target, "PUT", "/admin/configurations/refuse", {"ms": argument}, 0)
            if done:
                self.busy_until[target] = time.monotonic() + argument / 1000 + 0.5
        elif kind in ("kill", "term"):
            done = child.alive()
            child.signal(signal.SIGKILL if kind == "kill" else signal.SIGTERM)
        else:
            done = child.alive()
            child.signal(signal.SIGSTOP)
            self.stopped[target] = max(self.stopped.get(target, 0), time.monotonic() + argument)
        if done:
            self.applied[kind if target in INSTANCES or kind != "stop" else "stop-processor"] += 1
        else:
            self.say(f"t={at:6.1f}s   {kind} {target} could not be applied")
            self.skipped += 1

    def resume_due(self, everything=False):
        """SIGCONT the children whose SIGSTOP has lasted long enough (or all of them)."""
        now = time.monotonic()
        for name, until in list(self.stopped.items()):
            if everything or until <= now:
                self.arena.children[name].signal(signal.SIGCONT)
                del self.stopped[name]

    def calm(self, deadline):
        """Undo every fault: continue all, wait for refusals to end, clear the emulators."""
        self.resume_due(everything=True)
        for processor in PROCESSORS:
            while self.busy_until.get(processor, 0) > time.monotonic():
                time.sleep(0.1)
            for path, doc in (("/admin/configurations/chaos", {}),
                              ("/admin/configurations/failure", {"failure": False}),
                              ("/admin/configurations/delay", {"delay": 0})):
                if not self.admin(processor, "PUT", path, doc, max(1.0, deadline - time.monotonic())):
                    raise ArenaError(f"cannot clear {path} on the {processor} emulator")


# ---------------------------------------------------------------------------
# Quiescence and the checks
# ---------------------------------------------------------------------------

QUIESCENT = ("queue", "in_flight", "pinned")   # what /health must report at 0 once it is over


def processor_records(url, cids):
    """{cid: stored amount (Decimal)} for the ids this emulator holds, by GET /payments/{id}."""
    host, _, port = url.split("://", 1)[-1].rpartition(":")
    local = threading.local()

    def get(cid):
        for _ in range(3):
            conn = getattr(local, "conn", None) or http.client.HTTPConnection(host, int(port), timeout=10)
            local.conn = conn
            try:
                conn.request("GET", f"/payments/{cid}")
                response = conn.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                local.conn = None
                continue
            if response.status == 404:
                return cid, None
            if response.status == 200:
                return cid, json.loads(body, parse_float=Decimal)["amount"]
            raise RuntimeError(f"GET /payments/{cid} on {url}: {response.status} {body[:100]!r}")
        raise RuntimeError(f"GET /payments/{cid} on {url}: no answer")

    with ThreadPoolExecutor(CHECK_THREADS) as pool:
        return {cid: amount for cid, amount in pool.map(get, cids) if amount is not None}


def get_json(url, path, headers=None):
    status, body = http_request(url, "GET", path, headers=headers, timeout=10.0)
    if status != 200:
        raise RuntimeError(f"GET {url}{path}: {status} {body[:200]!r}")
    return json.loads(body, parse_float=Decimal)


class Verdict:
    """The outcome of one run: ok, the problems found, and the figures."""

    def __init__(self, seed):
        self.seed = seed
        self.problems = []
        self.figures = {}

    @property
    def ok(self):
        return not self.problems

    def line(self):
        f = self.figures
        head = "PASS" if self.ok else f"FAIL ({len(self.problems)} problems)"
        return (f"chaos verdict: {head} seed={self.seed} payments={f.get('attempts', 0)} "
                f"ids={f.get('ids', 0)} accepted={f.get('accepted_ids', 0)} "
                f"unknown={f.get('unknown_ids', 0)} refused={f.get('refused_ids', 0)} "
                f"stored default/fallback={f.get('stored', '-')} events={f.get('events', 0)}")


def check(verdict, attempts, sent_amount, records, backend, processors):
    """Fill verdict.problems from the client's attempts, the emulators' records and summaries."""
    problems = verdict.problems
    counts = {ACCEPTED: 0, UNKNOWN: 0, REFUSED: 0}
    for cid, tries in attempts.items():
        outcomes = {outcome for _, outcome, _ in tries}
        kind = ACCEPTED if ACCEPTED in outcomes else UNKNOWN if UNKNOWN in outcomes else REFUSED
        counts[kind] += 1
        holders = [p for p in PROCESSORS if cid in records[p]]
        history = "; ".join(f"t={t}s {o} {d}" for t, o, d in tries)
        if len(holders) > 1:
            problems.append(f"{cid} stored in both processors (attempts: {history})")
        if kind == ACCEPTED and not holders:
            problems.append(f"{cid} got a 2xx but is stored nowhere (attempts: {history})")
        if kind == REFUSED and holders:
            problems.append(f"{cid} stored in {holders[0]} though every attempt was refused "
                            f"(attempts: {history})")
        for p in holders:
            if records[p][cid] != Decimal(sent_amount[cid]):
                problems.append(f"{cid} stored in {p} with {records[p][cid]}, sent {sent_amount[cid]}")
    for p in PROCESSORS:
        held = processors[p]
        found = len(records[p])
        total = sum(records[p].values(), Decimal("0.00"))
        if held["totalRequests"] != found or held["totalAmount"] != total:
            problems.append(f"the {p} emulator holds {held['totalRequests']} payments "
                            f"({held['totalAmount']}) but {found} ({total}) of the ids sent")
        mine = backend[p]
        if (mine["totalRequests"], mine["totalAmount"]) != (held["totalRequests"], held["totalAmount"]):
            problems.append(f"summary {p}: backend {mine['totalRequests']} / {mine['totalAmount']}, "
                            f"processor {held['totalRequests']} / {held['totalAmount']}")
    verdict.figures.update({
        "ids": len(attempts), "attempts": sum(len(t) for t in attempts.values()),
        "accepted_ids": counts[ACCEPTED], "unknown_ids": counts[UNKNOWN], "refused_ids": counts[REFUSED],
        "stored": f"{len(records['default'])}/{len(records['fallback'])}",
    })


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------

def run(seed, duration_s=DEFAULT_DURATION_S, rate=DEFAULT_RATE, lb=None,
        quiescence_timeout_s=QUIESCENCE_TIMEOUT_S, say=print, log_path=None) -> Verdict:
    """One seeded chaos run; returns its Verdict (also printed through `say`)."""
    say(f"chaos: seed {seed} (replay: make chaos SEED={seed} DURATION={duration_s:g})")
    rng = random.Random(seed)
    payments = plan_payments(rng, int(duration_s * rate) + 1)
    events = plan_events(rng, duration_s)
    sent_amount = dict(payments)
    verdict = Verdict(seed)
    verdict.figures["events"] = len(events)
    OUT.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_path or OUT / f"chaos-{seed}.log")
    log_file = open(log_path, "w")
    log_lock = threading.Lock()

    def to_log(line):
        with log_lock:
            log_file.write(line + "\n")
            log_file.flush()

    def both(line):
        to_log(line)
        say(line)

    run_dir = Path(tempfile.mkdtemp(prefix="rinha-chaos-"))
    arena = Arena(lb_port=0, default_port=0, fallback_port=0, run_dir=run_dir, lb=lb, limits=False,
                  output=to_log)
    timings = {}
    try:
        t0 = time.monotonic()
        arena.start()
        timings["start_s"] = time.monotonic() - t0
        both(f"chaos: stack up in {timings['start_s']:.1f}s (lb {arena.url}, log {log_path}); "
             f"{len(events)} events over {duration_s:g}s, {rate} payments/s")
        chaos = Chaos(arena, both)
        started = time.monotonic()
        client = Client(arena.lb_port, payments, rate, started, started + duration_s)
        client.start()
        try:
            for at, kind, target, argument in events:
                while time.monotonic() < started + at:
                    chaos.resume_due()
                    time.sleep(min(0.05, max(0.0, started + at - time.monotonic())))
                chaos.apply(at, kind, target, argument)
            while time.monotonic() < started + duration_s:
                chaos.resume_due()
                time.sleep(0.05)
        finally:
            chaos.resume_due(everything=True)
            client.join()
        both(f"chaos: load over at t={time.monotonic() - started:.1f}s; applied "
             + ", ".join(f"{k} {n}" for k, n in chaos.applied.items()) + f"; skipped {chaos.skipped}")

        t1 = time.monotonic()
        chaos.calm(t1 + quiescence_timeout_s)
        waited, health = arena.wait_drained(max(1.0, t1 + quiescence_timeout_s - time.monotonic()), QUIESCENT,
                                            poll_s=0.25)
        quiet = waited is not None
        timings["quiescence_s"] = time.monotonic() - t1
        both(f"chaos: {'quiescent' if quiet else 'NOT quiescent'} after {timings['quiescence_s']:.1f}s: "
             + "; ".join(f"{n} " + (json.dumps({k: h[k] for k in ('queue', 'in_flight', 'pinned')})
                                    if h else "no answer") for n, h in health.items()))
        if not quiet:
            verdict.problems.append(f"no quiescence within {quiescence_timeout_s:g}s: "
                                    + json.dumps(health))
        restarted = [n for n in PROCESSOR_CHILD.values() if arena.children[n].restarts]
        if restarted:
            verdict.problems.append(f"emulator(s) {restarted} restarted: their records are lost")

        t2 = time.monotonic()
        cids = list(client.attempts)
        records = {p: processor_records(url, cids)
                   for p, url in (("default", arena.default_url), ("fallback", arena.fallback_url))}
        token = {"X-Rinha-Token": arena.token}
        processors = {p: get_json(url, "/admin/payments-summary", token)
                      for p, url in (("default", arena.default_url), ("fallback", arena.fallback_url))}
        backend = get_json(arena.url, "/payments-summary")
        check(verdict, client.attempts, sent_amount, records, backend, processors)
        timings["check_s"] = time.monotonic() - t2
        both("chaos: timings " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
        restarts = {n: arena.children[n].restarts for n in INSTANCES}
        faults = {}
        for p, url in (("default", arena.default_url), ("fallback", arena.fallback_url)):
            report = get_json(url, "/admin/chaos", token)
            faults[p] = {k: v for k, v in report["faults"].items() if v}
        both(f"chaos: instance restarts {restarts}; faults injected {json.dumps(faults)}")
        both(f"chaos: backend summary {json.dumps(backend, default=str)}")
        unknown = collections.Counter(str(detail).split(":")[0] for tries in client.attempts.values()
                                      for _, outcome, detail in tries if outcome == UNKNOWN)
        refused = collections.Counter(detail for tries in client.attempts.values()
                                      for _, outcome, detail in tries if outcome == REFUSED)
        both(f"chaos: attempts without an answer or with a load balancer error: {dict(unknown)}; "
             f"refused by an instance: {dict(refused)}")
        verdict.figures.update({"restarts": restarts, "faults": faults, "timings": timings})
    except ArenaError as error:
        verdict.problems.append(f"the stack failed: {error}")
    finally:
        arena.stop()
        if verdict.problems:   # keep the journals: they tell what each instance did
            for name in INSTANCES:
                journal = arena.journal_path(name)
                if journal.exists():
                    kept = log_path.with_name(f"{log_path.stem}-{name}.journal")
                    shutil.copyfile(journal, kept)
                    both(f"chaos: kept {kept}")
        shutil.rmtree(run_dir, ignore_errors=True)
    for problem in verdict.problems[:50]:
        both("chaos: PROBLEM " + problem)
    if len(verdict.problems) > 50:
        both(f"chaos: ... and {len(verdict.problems) - 50} more problems (all in {log_path})")
        for problem in verdict.problems[50:]:
            to_log("chaos: PROBLEM " + problem)
    both(verdict.line())
    log_file.close()
    return verdict


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=None, help="default: $SEED, else a random one")
    parser.add_argument("--duration", type=float, default=float(os.environ.get("DURATION") or DEFAULT_DURATION_S),
                        help="seconds of chaos ($DURATION)")
    parser.add_argument("--rate", type=int, default=int(os.environ.get("RATE") or DEFAULT_RATE),
                        help="payments per second ($RATE)")
    parser.add_argument("--lb", default=os.environ.get("LB") or None, choices=["haproxy", "nginx"])
    parser.add_argument("--quiescence-timeout", type=float, default=QUIESCENCE_TIMEOUT_S)
    args = parser.parse_args(argv)
    seed = args.seed
    if seed is None:
        seed = int(os.environ["SEED"]) if os.environ.get("SEED") else random.SystemRandom().randrange(1 << 31)
    verdict = run(seed, args.duration, args.rate, args.lb, args.quiescence_timeout)
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
