#!/usr/bin/env python3
"""A soak: the stack under the contest's limits at a steady rate for a long time: `make soak`.

    python -m bench.soak [--duration 600] [--rate 280] [--slice 60] [--lb haproxy]
                         [--history N] [--limits total|per-service] [--seed 1] [--no-record]
    python -m bench.soak --startup N [--repeats 3] [--no-record]

bench/arena.py starts the stack on free ports with its cgroup limits (load balancer + both
instances: 1.5 CPU / 350 MB in all, when running as root on cgroup v1; with --limits per-service
each service also within its own limits of docker-compose.yml; the emulators outside), k6
(bench/soak.js) offers POST /payments at a constant arrival rate (unique ids, amount 19.90,
client timeout 1.5 s, as the contest's requests) for --duration seconds. Every --slice seconds
the run samples each process's memory (RSS, from /proc), each instance's own confirmed payments
(/health), the journals' and ledger files' sizes and the cgroup's memory; k6 reports p99 and
failures per slice. After the load, the stack is left to drain (bounded) and the backend's count
is compared with the 2xx the client got (the lag).

Memory: RSS after warm-up (the sample at the end of the first slice) and at the end of the load,
and the slope between them in bytes per payment per instance: per payment the instance itself
confirmed, and per payment of the whole backend (each instance also keeps its peer's replica).

--history N: before the stack starts, N confirmed payments (requestedAt spread over the N/1000
seconds before the start, one a millisecond on average; amounts 0.01-10,000.00; 85 % default)
are written straight into the instances' ledger files in rinha.py's binary format (History): each
payment is api1's or api2's, in its own ledger and in the other's replica of it, all of it saved
and frozen, so that both agree and replication has nothing to resend. The emulators know nothing
of it. After the drain, spot windows of GET /payments-summary (in the generated past, in the live
part, spanning both, and everything) are compared, exactly, per processor, with the generated
totals plus the emulators' own records (GET /admin/payments-summary of the same window).

--startup N: no load; start-up time of one instance (api1, under its compose limits when they
can be applied) holding N confirmed payments (its own ledger and a replica of api2's, generated
as above; its peer unreachable), from spawn to its "listening on" line, median of --repeats,
against the same with no history; RSS once it listens and its first whole-history summary.

The figures are printed and, unless --no-record, inserted as a section in bench/RESULTS.md
(above the `make bench` table, which stays last). Output files go to bench/out/soak-*.
"""

import argparse
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

from bench.arena import Arena, compose_limits, start_measured
from bench.common import (BENCH, INSTANCES, LB_SERVICE, OUT, REPO, RINHA, PeriodicSampler, free_port,
                          http_request, require_k6, run_k6)
from bench.results import RESULTS, fmt, git_commit, insert_section, machine, now

SCRIPT = BENCH / "soak.js"
SOAK_MARKER = "<!-- make soak inserts its sections above this line -->"

DEFAULT_DURATION_S = 600       # ten minutes
DEFAULT_RATE = 280             # payments per second: the contest's mean (16,750 in 60 s)
DEFAULT_SLICE_S = 60           # one row of figures per slice
K6_MAX_VUS = 600               # enough for 280/s even at 1.5 s per request
DRAIN_TIMEOUT_S = 60.0         # bound on the wait for empty queues after the load
PROCESS_NAMES = INSTANCES + (LB_SERVICE,)

HISTORY_FALLBACK_SHARE = 0.15  # of the generated payments, confirmed by the fallback
HISTORY_MAX_CENTS = 1_000_000  # generated amounts: 0.01 to 10,000.00, as AMOUNTS=random
HISTORY_GAP_MS = 1000          # the generated history ends this long before the stack starts
OPEN_LOW, OPEN_HIGH = -(1 << 62), 1 << 62   # rinha.py's open window bounds
STARTUP_REPEATS = 3
STARTUP_TIMEOUT_S = 60.0
SLOPE_TARGET = 2.0             # bytes per payment per instance (the issue "Runs for days under the limits")
STARTUP_TARGET_S = 1.0


def log(message):
    print(f"soak: {message}", flush=True)


def mb(value):
    return None if value is None else value / (1 << 20)


def now_ms():
    return time.time_ns() // 1_000_000


def iso(ms):
    """ms -> '2025-07-10T12:34:56.789Z', as the contest's clients write a window's bounds."""
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# ---------------------------------------------------------------------------
# A generated history, written straight into the ledger files
# ---------------------------------------------------------------------------

class History:
    """`count` confirmed payments ending at end_ms (requestedAt over the count ms before it, so
    one a millisecond on average), each api1's or api2's, with its generated totals per window.

    The files are rinha.py's (rinha.Ledger): per ledger prefix, `.log` (every entry in
    confirmation order, here requestedAt order: processor, ms, cents as native int64),
    `.0` / `.1` (per processor, sorted: ms and the running total of cents) and `.checkpoint`
    ("epoch saved frozen0 frozen1 frozen_ms0 frozen_ms1 frozen_cents0 frozen_cents1", no tail:
    everything saved and frozen). The own ledger of an instance is `<journal>.ledger`; its replica
    of a peer's is `<journal>.replica-<peer>`, byte for byte the peer's own."""

    def __init__(self, count, end_ms, seed=1):
        import numpy as np  # matplotlib's dependency (requirements-dev.txt)
        self.np = np
        rng = np.random.default_rng(seed)
        self.count, self.end_ms = count, end_ms
        self.start_ms = end_ms - max(1, count) + 1
        self.ms = np.sort(rng.integers(self.start_ms, end_ms, count, endpoint=True, dtype=np.int64))
        self.cents = rng.integers(1, HISTORY_MAX_CENTS, count, endpoint=True, dtype=np.int64)
        self.processor = (rng.random(count) < HISTORY_FALLBACK_SHARE).astype(np.int64)
        self.origin = rng.integers(0, len(INSTANCES), count, dtype=np.int8)
        self.columns = []  # per processor: (sorted ms, running cents with a leading 0)
        for p in (0, 1):
            chosen = self.processor == p
            self.columns.append((self.ms[chosen], np.concatenate(([0], np.cumsum(self.cents[chosen])))))
        self.own = {name: int(np.count_nonzero(self.origin == i)) for i, name in enumerate(INSTANCES)}

    def totals(self, low=OPEN_LOW, high=OPEN_HIGH):
        """[default count, cents, fallback count, cents] with low <= requestedAt <= high."""
        out = []
        for times, running in self.columns:
            first = int(self.np.searchsorted(times, low, "left"))
            last = int(self.np.searchsorted(times, high, "right"))
            out += [last - first, int(running[last] - running[first])]
        return out

    def ledger(self, origin_index):
        """The files of one origin's ledger: {suffix: bytes}."""
        np = self.np
        chosen = self.origin == origin_index
        ms, cents, processor = self.ms[chosen], self.cents[chosen], self.processor[chosen]
        files = {".log": np.stack([processor, ms, cents], axis=1).tobytes()}
        frozen, frozen_ms, frozen_cents = [], [], []
        for p in (0, 1):
            mine = processor == p
            times, running = ms[mine], np.cumsum(cents[mine])
            files[f".{p}"] = np.stack([times, running], axis=1).tobytes()
            frozen.append(len(times))
            frozen_ms.append(int(times[-1]) if len(times) else OPEN_LOW)
            frozen_cents.append(int(running[-1]) if len(times) else 0)
        # epoch 0 (no purge yet), all saved and frozen, nothing dropped (kept from the first, from any time,
        # the log from 0), an empty tail: rinha.Ledger's checkpoint line
        head = [0, len(ms), *frozen, *frozen_ms, *frozen_cents, 0, 0, 0, 0, -(1 << 62), 0]
        files[".checkpoint"] = " ".join(map(str, head)).encode() + b"\n"
        return files

    def write(self, journals):
        """Write every ledger that the instances {name: journal path} hold: each its own, and
        its replica of each other origin. Returns the bytes written per instance. Checks each
        with rinha.Ledger: its count and its whole-history totals."""
        import rinha
        assert rinha.LOG_ENTRY.size == 24 and rinha.FROZEN_ENTRY.size == 16
        written = dict.fromkeys(journals, 0)
        for index, origin in enumerate(INSTANCES):
            files = self.ledger(index)
            for holder, journal in journals.items():
                prefix = f"{journal}.ledger" if holder == origin else f"{journal}.replica-{origin}"
                for suffix in (".log", ".0", ".1", ".checkpoint"):   # the checkpoint last
                    with open(prefix + suffix, "wb", buffering=0) as out:
                        out.write(files[suffix])
                    written[holder] += len(files[suffix])
                check = rinha.Ledger(prefix)
                try:
                    wanted = self.totals_of(index)
                    got = [*check.window(0, OPEN_LOW, OPEN_HIGH), *check.window(1, OPEN_LOW, OPEN_HIGH)]
                    if check.count() != self.own[origin] or got != wanted:
                        raise RuntimeError(f"{prefix}: rinha.Ledger reads {check.count()} entries, {got}; "
                                           f"written {self.own[origin]}, {wanted}")
                finally:
                    check.close()
        return written

    def totals_of(self, origin_index):
        """The whole-history totals of one origin."""
        chosen = self.origin == origin_index
        out = []
        for p in (0, 1):
            mine = chosen & (self.processor == p)
            out += [int(self.np.count_nonzero(mine)), int(self.cents[mine].sum())]
        return out


# ---------------------------------------------------------------------------
# Summaries: the backend against the generated history plus the emulators
# ---------------------------------------------------------------------------

def summary_cents(body):
    """A summary's JSON -> [default count, cents, fallback count, cents] (amounts read exactly)."""
    doc = json.loads(body, parse_float=Decimal)
    out = []
    for name in ("default", "fallback"):
        part = doc[name] if name in doc else doc
        cents = Decimal(part["totalAmount"]) * 100
        if cents != cents.to_integral_value():
            raise ValueError(f"not whole cents: {part['totalAmount']}")
        out += [int(part["totalRequests"]), int(cents)]
    return out


def spot_windows(history, live_start_ms, live_end_ms):
    """(name, from ms, to ms): in the generated past, in the live part, across both, everything
    (None: no bound)."""
    windows = []
    if history is not None:
        start, end = history.start_ms, history.end_ms
        span = end - start
        windows += [("history: 1 s", start + span * 37 // 100, start + span * 37 // 100 + 999),
                    ("history: a tenth", start + span // 2, start + span * 6 // 10),
                    ("history: all of it", start, end)]
    length = live_end_ms - live_start_ms
    windows += [("live: 1 s", live_start_ms + length * 8 // 10, live_start_ms + length * 8 // 10 + 999),
                ("live: a tenth", live_start_ms + length * 45 // 100, live_start_ms + length * 55 // 100)]
    if history is not None:
        windows.append(("history and live", history.end_ms - (history.end_ms - history.start_ms) // 4,
                        live_start_ms + length * 3 // 10))
    windows.append(("everything (no bounds)", None, None))
    return windows


def check_windows(arena, history, windows):
    """Each window's backend summary against the generated totals plus both emulators' records."""
    rows = []
    for name, low, high in windows:
        query = "" if low is None else f"?from={iso(low)}&to={iso(high)}"
        started = time.perf_counter()
        status, body = http_request(arena.url, "GET", "/payments-summary" + query, timeout=30.0)
        took_ms = 1000 * (time.perf_counter() - started)
        backend = summary_cents(body) if status == 200 else None
        expected = history.totals(OPEN_LOW if low is None else low, OPEN_HIGH if high is None else high) \
            if history is not None else [0, 0, 0, 0]
        emulated = []
        for url in (arena.default_url, arena.fallback_url):
            status, answer = http_request(url, "GET", "/admin/payments-summary" + query,
                                          headers={"X-Rinha-Token": arena.token}, timeout=60.0)
            if status != 200:
                raise RuntimeError(f"{url}/admin/payments-summary{query}: status {status}")
            emulated += summary_cents(answer)[:2]
        generated = list(expected)
        expected = [a + b for a, b in zip(expected, emulated)]
        rows.append({"window": name, "from": None if low is None else iso(low), "to": None if high is None else iso(high),
                     "generated": generated, "emulators": emulated, "expected": expected, "backend": backend,
                     "exact": backend == expected, "backend_ms": took_ms})
    return rows


# ---------------------------------------------------------------------------
# The soak
# ---------------------------------------------------------------------------

def ledger_bytes(arena, name):
    """Bytes of an instance's ledger files: its own and its replicas."""
    total = 0
    prefix = arena.journal_path(name).name + "."
    for path in arena.run_dir.iterdir():
        if path.name.startswith(prefix) and (".ledger." in path.name or ".replica-" in path.name):
            try:
                total += path.stat().st_size
            except OSError:
                pass
    return total


def memory_sampler(arena, slice_s):
    """Samples memory, confirmed payments and file sizes at the start, at every slice boundary and
    at stop(final=True)."""

    def sample(at):
        stats = arena.stats()
        row = {"t_s": round(at, 1), "cgroup_mb": mb(stats.get("memory_usage_bytes")),
               "cgroup_peak_mb": mb(stats.get("memory_max_usage_bytes"))}
        for name in PROCESS_NAMES:
            proc = stats["processes"].get(name, {})
            row[f"{name}_rss_bytes"] = proc.get("rss_bytes")
            row[f"{name}_rss_mb"] = mb(proc.get("rss_bytes"))
            row[f"{name}_restarts"] = proc.get("restarts")
        for name in INSTANCES:
            try:
                row[f"{name}_journal_mb"] = mb(arena.journal_path(name).stat().st_size)
            except OSError:
                row[f"{name}_journal_mb"] = None
            row[f"{name}_ledger_mb"] = mb(ledger_bytes(arena, name))
            health = arena.health(name, timeout=5.0)
            row[f"{name}_confirmed"] = (health["default"]["ledger_requests"] + health["fallback"]["ledger_requests"]
                                        if health else None)   # its own ledger, history included
        return row

    return PeriodicSampler(sample, slice_s, name="soak-sampler")


def remembered_ids():
    """REMEMBERED_IDS the instances run with: the compose file's, else rinha.py's default."""
    import rinha
    from bench.arena import compose_knobs
    return int(os.environ.get("REMEMBERED_IDS") or compose_knobs().get("REMEMBERED_IDS") or rinha.Config().remembered_ids)


def live_confirmed(sample, history):
    """The backend's live payments at a sample (own ledgers, history left out), or None."""
    counts = [sample[f"{n}_confirmed"] for n in INSTANCES]
    if None in counts:
        return None
    return sum(counts) - (history.count if history is not None else 0)


def warm_ups(samples, history, ids):
    """{label: index of the sample} that the memory slopes start from: the end of the first
    slice, and the first sample at which the backend had confirmed at least `ids` live payments
    (REMEMBERED_IDS: each instance remembers that many correlationIds, its own and its peer's,
    about 120 bytes each, before the oldest are forgotten; below it the id memory still grows)."""
    out = {}
    if len(samples) >= 3:
        out["end of the first slice"] = 1
        full = next((i for i, s in enumerate(samples[1:-1], 1) if (live_confirmed(s, history) or 0) >= ids), None)
        if full is not None:
            out[f"{ids:,} ids remembered"] = full
    return out


def memory_slopes(samples, history, warm_index):
    """Per instance: RSS after warm-up (samples[warm_index]) and at the end of the load, its own
    payments confirmed meanwhile, the backend's, and bytes per payment of each."""
    warm, end = samples[warm_index], samples[-1]
    out = {}
    backend = None
    if live_confirmed(warm, history) is not None and live_confirmed(end, history) is not None:
        backend = live_confirmed(end, history) - live_confirmed(warm, history)
    for name in INSTANCES:
        rss_warm, rss_end = warm[f"{name}_rss_bytes"], end[f"{name}_rss_bytes"]
        own = None
        if warm[f"{name}_confirmed"] is not None and end[f"{name}_confirmed"] is not None:
            own = end[f"{name}_confirmed"] - warm[f"{name}_confirmed"]
        grown = None if rss_warm is None or rss_end is None else rss_end - rss_warm
        out[name] = {"warm_t_s": warm["t_s"], "end_t_s": end["t_s"], "rss_warm_bytes": rss_warm, "rss_end_bytes": rss_end,
                     "own_payments": own, "backend_payments": backend,
                     "bytes_per_own_payment": grown / own if grown is not None and own else None,
                     "bytes_per_backend_payment": grown / backend if grown is not None and backend else None}
    return out


def run_soak_k6(arena, rate, duration_s, slice_s, out):
    summary_path = out / "soak-k6.json"
    if summary_path.exists():
        summary_path.unlink()
    settings = {"BACKEND_URL": arena.url, "RATE": rate, "DURATION_S": int(duration_s), "SLICE_S": int(slice_s),
                "MAX_VUS": K6_MAX_VUS, "SUMMARY_PATH": summary_path}
    run_k6(SCRIPT, settings, log_path=out / "soak-k6.log", timeout_s=duration_s + 120)
    if not summary_path.exists():
        raise RuntimeError(f"k6 wrote no {summary_path} (log {out / 'soak-k6.log'})")
    return json.loads(summary_path.read_text())


def soak(duration_s, rate, slice_s, lb=None, history_count=0, limits=True, seed=1):
    """Run the soak; -> dict with the samples, the k6 figures, lag, memory slopes, spot windows
    and settings."""
    require_k6()
    OUT.mkdir(parents=True, exist_ok=True)
    ids = remembered_ids()
    arena = Arena.on_free_ports(OUT / "soak-arena.log", "rinha-soak-", lb=lb, limits=limits,
                                env={"PURGE_TOKEN": secrets.token_hex(8)})
    history, generated = None, {}
    try:
        if history_count:
            started = time.perf_counter()
            history = History(history_count, now_ms() - HISTORY_GAP_MS, seed)
            generated["made_s"] = time.perf_counter() - started
            written = history.write({name: arena.journal_path(name) for name in INSTANCES})
            generated["written_s"] = time.perf_counter() - started - generated["made_s"]
            generated["bytes_per_instance"] = written
            generated["own"] = history.own
            generated["totals"] = history.totals()
            log(f"history: {history_count:,} confirmed payments generated in {generated['made_s']:.1f} s and written "
                f"in {generated['written_s']:.1f} s ({', '.join(f'{n} {mb(b):.0f} MB' for n, b in written.items())})")
        start_measured(arena, log)
        arena.reset_peak_memory()
        log(f"k6: {rate} payments/s for {duration_s:g} s, one row per {slice_s:g} s "
            f"(log {OUT / 'soak-k6.log'})")
        sampler = memory_sampler(arena, slice_s)
        live_start_ms = now_ms()
        sampler.start()
        try:
            k6 = run_soak_k6(arena, rate, duration_s, slice_s, OUT)
        finally:
            sampler.stop(final=True)
        drained, _ = arena.wait_drained(DRAIN_TIMEOUT_S, poll_s=0.5)
        live_end_ms = now_ms()
        status, body = http_request(arena.url, "GET", "/payments-summary", timeout=30.0)
        summary = json.loads(body) if status == 200 else None
        windows = check_windows(arena, history, spot_windows(history, live_start_ms, live_end_ms))
        for row in windows:
            log(f"window {row['window']}: {'exact' if row['exact'] else 'NOT EXACT'} "
                f"(backend {row['backend']}, expected {row['expected']}; {row['backend_ms']:.0f} ms)")
    finally:
        arena.stop()
    ok = k6["total"]["requests"] - k6["total"]["failed"]
    stored = (summary["default"]["totalRequests"] + summary["fallback"]["totalRequests"]) if summary else None
    live = None if stored is None else stored - (history_count or 0)
    return {"duration_s": duration_s, "rate": rate, "slice_s": slice_s, "lb": arena.lb,
            "limits": arena.limits_applied, "limits_kind": limits, "limits_reason": arena.limits_reason,
            "k6": k6, "samples": sampler.samples, "drain_s": drained,
            "history": history_count or 0, "generated": generated,
            "successful_posts": ok, "backend_payments": stored, "live_payments": live,
            "lag": None if live is None else ok - live,
            "remembered_ids": ids, "windows": windows,
            "slopes": {label: memory_slopes(sampler.samples, history, index)
                       for label, index in warm_ups(sampler.samples, history, ids).items()}}


def cents_text(cents):
    return f"{cents // 100:,}.{cents % 100:02d}"


def totals_text(totals):
    if totals is None:
        return "-"
    return f"{totals[0]:,} / {cents_text(totals[1])}; {totals[2]:,} / {cents_text(totals[3])}"


def render(result, command):
    """The RESULTS.md section for one soak."""
    k6, samples = result["k6"], result["samples"]
    first, last = samples[0], samples[-1]
    total = k6["total"]
    when = now()
    if not result["limits"]:
        limits = f"no limits ({result['limits_reason']})"
    elif result["limits_kind"] == "per-service":
        limits = "1.5 CPU / 350 MB cgroup, each service within its compose limits (api 0.6 CPU / 160 MB, lb 0.3 / 30)"
    else:
        limits = "1.5 CPU / 350 MB cgroup"
    history = result["history"]
    payments = ""
    if history:
        generated = result["generated"]
        payments = (f" History: {history:,} confirmed payments generated before the start "
                    f"({generated['made_s'] + generated['written_s']:.1f} s; "
                    + ", ".join(f"{n} {generated['own'][n]:,} own, {mb(generated['bytes_per_instance'][n]):.0f} MB of ledger files"
                                for n in INSTANCES)
                    + f"); live {fmt(result['live_payments'], ',')}; the backend's count after the drain "
                    f"{fmt(result['backend_payments'], ',')}.")
    lines = [
        f"### Soak {when} UTC, {git_commit()}, `{command}`",
        "",
        f"{machine()}; lb {result['lb']}; {limits}; {result['rate']} payments/s for "
        f"{result['duration_s']:g} s: {total['requests']} requests, p99 {fmt(total['p99_ms'], '.2f')} ms, "
        f"max {fmt(total['max_ms'], '.0f')} ms, failed {total['failed']}, dropped by k6 {total['dropped']}; "
        f"lag after the drain {fmt(result['lag'], 'd')} (2xx answered minus live payments the backend counts; "
        f"drained in {fmt(result['drain_s'], '.1f')} s).{payments}",
        "",
        "| process | RSS at start MB | RSS at end MB | restarts |",
        "| --- | --- | --- | --- |",
    ]
    for name in PROCESS_NAMES:
        lines.append(f"| {name} | {fmt(first[f'{name}_rss_mb'], '.1f')} | {fmt(last[f'{name}_rss_mb'], '.1f')} | "
                     f"{fmt(last[f'{name}_restarts'], 'd')} |")
    lines.append(f"| cgroup (lb + instances) | {fmt(first['cgroup_mb'], '.1f')} | {fmt(last['cgroup_mb'], '.1f')} "
                 f"(peak {fmt(last['cgroup_peak_mb'], '.1f')}) | |")
    if result["slopes"]:
        lines += [
            "",
            f"Memory after warm-up: RSS at a warm-up sample and at the end of the load, and the slope between "
            f"them (target: at most {SLOPE_TARGET:g} bytes per payment per instance). Warm-up from the end of the "
            f"first slice, and from the first sample at which the backend had confirmed REMEMBERED_IDS live "
            f"payments (each instance remembers the last {result['remembered_ids']:,} correlationIds, its own and "
            f"its peer's, about 120 bytes each; until then that memory fills):",
            "",
            "| instance | warm-up | RSS warm MB (at s) | RSS end MB (at s) | grown KB | own payments since | bytes per own "
            "payment | backend payments since | bytes per backend payment |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for label, slopes in result["slopes"].items():
            for name, s in slopes.items():
                grown = None if s["rss_warm_bytes"] is None or s["rss_end_bytes"] is None else \
                    (s["rss_end_bytes"] - s["rss_warm_bytes"]) / 1024
                lines.append(
                    f"| {name} | {label} | {fmt(mb(s['rss_warm_bytes']), '.1f')} ({s['warm_t_s']:g}) | "
                    f"{fmt(mb(s['rss_end_bytes']), '.1f')} ({s['end_t_s']:g}) | {fmt(grown, '.0f')} | "
                    f"{fmt(s['own_payments'], ',')} | {fmt(s['bytes_per_own_payment'], '.2f')} | "
                    f"{fmt(s['backend_payments'], ',')} | {fmt(s['bytes_per_backend_payment'], '.2f')} |")
    if result["windows"]:
        lines += [
            "",
            "Spot windows after the drain: the backend's GET /payments-summary against "
            + ("the generated history's totals plus " if history else "")
            + "the emulators' records of the same window (count / amount, default; fallback):",
            "",
            "| window | from | to | expected | backend | exact | backend ms |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in result["windows"]:
            lines.append(f"| {row['window']} | {row['from'] or '-'} | {row['to'] or '-'} | {totals_text(row['expected'])} | "
                         f"{totals_text(row['backend'])} | {'yes' if row['exact'] else '**NO**'} | "
                         f"{row['backend_ms']:.0f} |")
    lines += [
        "",
        "| slice (s) | requests | p99 ms | max ms | failed | "
        + " | ".join(f"{n} RSS MB" for n in PROCESS_NAMES) + " | "
        + " | ".join(f"{n} journal MB | {n} ledgers MB" for n in INSTANCES) + " |",
        "| --- " * (5 + len(PROCESS_NAMES) + 2 * len(INSTANCES)) + "|",
    ]
    slice_s = result["slice_s"]
    for i, figures in enumerate(k6["slices"]):
        sample = samples[min(i + 1, len(samples) - 1)]   # taken at the end of the slice
        lines.append(
            f"| {i * slice_s:g}-{min((i + 1) * slice_s, result['duration_s']):g} | {figures['requests']} | "
            f"{fmt(figures['p99_ms'], '.2f')} | {fmt(figures['max_ms'], '.0f')} | {figures['failed']} | "
            + " | ".join(fmt(sample[f"{n}_rss_mb"], ".1f") for n in PROCESS_NAMES) + " | "
            + " | ".join(f"{fmt(sample[f'{n}_journal_mb'], '.2f')} | {fmt(sample.get(f'{n}_ledger_mb'), '.1f')}"
                         for n in INSTANCES) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Start-up with a history
# ---------------------------------------------------------------------------

def startup_cgroup():
    """(Cgroups limited as the compose file's api1, or None; why not)."""
    from bench.arena import Cgroups
    parents, reason = Cgroups.probe()
    if not parents:
        return None, reason
    cpus, memory = compose_limits()[INSTANCES[0]]
    cgroup = Cgroups(f"rinha-arena-0-{os.getpid()}-{secrets.token_hex(3)}")  # arena.py removes it if we are killed
    try:
        cgroup.create(parents, cpus, memory)
    except OSError as error:
        return None, f"cannot create cgroup: {error}"
    return cgroup, f"{cpus:g} CPU / {memory >> 20} MB"


def start_once(directory, history, cgroup):
    """Start api1 on the files in `directory`: seconds from spawn to "listening on", RSS then,
    and its first summary (ms, exact against the history)."""
    from bench.arena import _preexec, compose_knobs
    name, peer = INSTANCES
    socket_path = directory / f"{name}.sock"
    env = dict(os.environ)
    env.update(compose_knobs())
    env.update({"LISTEN": f"unix:{socket_path}", "INSTANCE_ID": name, "PEERS": f"unix:{directory / peer}.sock",
                "JOURNAL_PATH": str(directory / f"{name}.journal"),
                "DEFAULT_PROCESSOR_URL": f"http://127.0.0.1:{free_port()}",   # nothing listens: no payments here
                "FALLBACK_PROCESSOR_URL": f"http://127.0.0.1:{free_port()}"})
    output = []
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(RINHA)], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=_preexec(cgroup.procs_files() if cgroup else ()))
    timer = threading.Timer(STARTUP_TIMEOUT_S, proc.kill)
    timer.start()
    try:
        listening = None
        for line in iter(proc.stdout.readline, b""):
            output.append(line.decode("utf-8", "replace").rstrip())
            if b"listening on" in line:
                listening = time.perf_counter() - started
                break
        if listening is None:
            raise RuntimeError(f"rinha.py exited ({proc.wait()}) before listening:\n" + "\n".join(output[-20:]))
        rss = int(next(line.split()[1] for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                       if line.startswith("VmRSS:"))) * 1024
        pump = threading.Thread(target=lambda: output.extend(line.decode("utf-8", "replace").rstrip()
                                                             for line in iter(proc.stdout.readline, b"")), daemon=True)
        pump.start()
        asked = time.perf_counter()
        status, body = http_request(f"unix:{socket_path}", "GET", "/payments-summary", timeout=10.0)
        summary_ms = 1000 * (time.perf_counter() - asked)
        totals = summary_cents(body) if status == 200 else None
        expected = history.totals() if history is not None else [0, 0, 0, 0]
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        pump.join(5)
        return {"listening_s": listening, "rss_bytes": rss, "summary_ms": summary_ms, "summary": totals,
                "exact": totals == expected}
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def measure_startup(count, repeats=STARTUP_REPEATS, seed=1):
    """Start-up of one instance with no history and with `count` confirmed payments."""
    cgroup, limits = startup_cgroup()
    rows = []
    try:
        for size in (0, count):
            directory = Path(tempfile.mkdtemp(prefix="rinha-startup-"))
            try:
                history, row = None, {"history": size}
                if size:
                    started = time.perf_counter()
                    history = History(size, now_ms() - HISTORY_GAP_MS, seed)
                    row["files_bytes"] = history.write({INSTANCES[0]: directory / f"{INSTANCES[0]}.journal"})[INSTANCES[0]]
                    row["generated_s"] = time.perf_counter() - started
                    log(f"start-up: {size:,} payments generated and written in {row['generated_s']:.1f} s "
                        f"({mb(row['files_bytes']):.0f} MB)")
                runs = [start_once(directory, history, cgroup) for _ in range(repeats)]
                for run in runs:
                    log(f"start-up with {size:,}: listening after {1000 * run['listening_s']:.0f} ms, "
                        f"RSS {mb(run['rss_bytes']):.1f} MB, first summary {run['summary_ms']:.0f} ms "
                        f"({'exact' if run['exact'] else 'NOT EXACT: ' + str(run['summary'])})")
                row["runs"] = runs
                rows.append(row)
            finally:
                shutil.rmtree(directory, ignore_errors=True)
    finally:
        if cgroup:
            cgroup.remove()
    return {"limits": limits if cgroup else f"none ({limits})", "repeats": repeats, "rows": rows}


def render_startup(result, command):
    lines = [
        f"### Start-up {now()} UTC, {git_commit()}, `{command}`",
        "",
        f"{machine()}; one instance (api1) under {result['limits']}, holding its own ledger and a replica of "
        f"api2's (the history split between them as in a soak), its peer unreachable, its journal empty (none at "
        f"the first start); from spawn to its \"listening on\" line, median of {result['repeats']} (min-max); "
        f"RSS then; its first summary of the whole history, against the generated totals. Target: under "
        f"{STARTUP_TARGET_S:g} s with 10,000,000.",
        "",
        "| confirmed payments | ledger files MB | start-up ms, median (min-max) | RSS after start MB "
        "| first summary ms | summary exact |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["rows"]:
        runs = row["runs"]
        times = [1000 * r["listening_s"] for r in runs]
        lines.append(f"| {row['history']:,} | {fmt(mb(row.get('files_bytes')), '.0f')} | "
                     f"{statistics.median(times):.0f} ({min(times):.0f}-{max(times):.0f}) | "
                     f"{mb(statistics.median(r['rss_bytes'] for r in runs)):.1f} | "
                     f"{statistics.median(r['summary_ms'] for r in runs):.1f} | "
                     f"{'yes' if all(r['exact'] for r in runs) else '**NO**'} |")
    return "\n".join(lines) + "\n"


def record(section):
    """Insert the section above SOAK_MARKER (added, with a heading, on first use)."""
    first_use = ("## Soak runs\n\nSections inserted by `make soak` (`python -m bench.soak`), newest last: "
                 "the stack under its limits at a steady rate, memory per process (RSS) at the start "
                 "and the end, journal sizes and p99 per slice.\n\n" + SOAK_MARKER + "\n\n"
                 "## make bench runs\n\n")
    insert_section(section, SOAK_MARKER, first_use, "\n**Contest scenario**")   # the make bench table's legend


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=float(os.environ.get("DURATION") or DEFAULT_DURATION_S))
    parser.add_argument("--rate", type=int, default=int(os.environ.get("RATE") or DEFAULT_RATE))
    parser.add_argument("--slice", type=float, default=float(os.environ.get("SLICE") or DEFAULT_SLICE_S))
    parser.add_argument("--lb", default=os.environ.get("LB") or None, choices=["haproxy", "nginx"])
    parser.add_argument("--history", type=int, default=int(os.environ.get("HISTORY") or 0),
                        help="confirmed payments generated into the ledgers before the start")
    parser.add_argument("--limits", default=os.environ.get("LIMITS") or "total", choices=["total", "per-service"],
                        help="per-service: each service also within its compose limits")
    parser.add_argument("--seed", type=int, default=1, help="of the generated history")
    parser.add_argument("--startup", type=int, default=None, metavar="N",
                        help="measure start-up with N confirmed payments instead (no load)")
    parser.add_argument("--repeats", type=int, default=STARTUP_REPEATS, help="start-ups per history (--startup)")
    parser.add_argument("--no-record", action="store_true", help="print the section, do not insert it")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.rate < 1 or args.slice < 1:
        parser.error("--duration, --rate and --slice must be at least 1")
    if args.history < 0 or (args.startup is not None and args.startup < 1) or args.repeats < 1:
        parser.error("--history must be at least 0, --startup and --repeats at least 1")
    command = "make soak" if not (argv or sys.argv[1:]) else "python -m bench.soak " + " ".join(
        argv if argv is not None else sys.argv[1:])
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        if args.startup is not None:
            result = measure_startup(args.startup, args.repeats, args.seed)
            name, section = "soak-startup.json", render_startup(result, command)
        else:
            result = soak(args.duration, args.rate, args.slice, args.lb, args.history,
                          "per-service" if args.limits == "per-service" else True, args.seed)
            name, section = "soak-result.json", render(result, command)
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        log(f"failed: {error}")
        return 1
    (OUT / name).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(section)
    if not args.no_record:
        record(section)
        log(f"inserted into {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
