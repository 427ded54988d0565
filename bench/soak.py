#!/usr/bin/env python3
"""A soak: the stack under the contest's limits at a steady rate for a long time: `make soak`.

    python -m bench.soak [--duration 600] [--rate 280] [--slice 60] [--lb haproxy] [--no-record]

bench/arena.py starts the stack on free ports with its cgroup limits (load balancer + both
instances: 1.5 CPU / 350 MB, when running as root on cgroup v1; the emulators outside), k6
(bench/soak.js) offers POST /payments at a constant arrival rate (unique ids, amount 19.90, client timeout
1.5 s, as the contest's requests) for --duration seconds. Every --slice seconds the run
samples each process's memory (RSS, from /proc), the journals' sizes and the cgroup's
memory; k6 reports p99 and failures per slice. After the load, the stack is left to drain
(bounded) and the backend's count is compared with the 2xx the client got (the lag).
The figures are printed and, unless --no-record, inserted as a section in bench/RESULTS.md
(above the `make bench` table, which stays last). Output files go to bench/out/soak-*.
"""

import argparse
import json
import os
import secrets
import subprocess
import sys

from bench.arena import Arena, start_measured
from bench.common import BENCH, INSTANCES, LB_SERVICE, OUT, REPO, PeriodicSampler, http_request, require_k6, run_k6
from bench.results import RESULTS, fmt, git_commit, insert_section, machine, now

SCRIPT = BENCH / "soak.js"
SOAK_MARKER = "<!-- make soak inserts its sections above this line -->"

DEFAULT_DURATION_S = 600       # ten minutes
DEFAULT_RATE = 280             # payments per second: the contest's mean (16,750 in 60 s)
DEFAULT_SLICE_S = 60           # one row of figures per slice
K6_MAX_VUS = 600               # enough for 280/s even at 1.5 s per request
DRAIN_TIMEOUT_S = 60.0         # bound on the wait for empty queues after the load
PROCESS_NAMES = INSTANCES + (LB_SERVICE,)


def log(message):
    print(f"soak: {message}", flush=True)


def mb(value):
    return None if value is None else value / (1 << 20)


def memory_sampler(arena, slice_s):
    """Samples memory and journal sizes at the start, at every slice boundary and at stop(final=True)."""

    def sample(at):
        stats = arena.stats()
        row = {"t_s": round(at, 1), "cgroup_mb": mb(stats.get("memory_usage_bytes")),
               "cgroup_peak_mb": mb(stats.get("memory_max_usage_bytes"))}
        for name in PROCESS_NAMES:
            proc = stats["processes"].get(name, {})
            row[f"{name}_rss_mb"] = mb(proc.get("rss_bytes"))
            row[f"{name}_restarts"] = proc.get("restarts")
        for name in INSTANCES:
            try:
                row[f"{name}_journal_mb"] = mb(arena.journal_path(name).stat().st_size)
            except OSError:
                row[f"{name}_journal_mb"] = None
        return row

    return PeriodicSampler(sample, slice_s, name="soak-sampler")


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


def soak(duration_s, rate, slice_s, lb=None):
    """Run the soak; -> dict with the samples, the k6 figures, lag and settings."""
    require_k6()
    OUT.mkdir(parents=True, exist_ok=True)
    arena = start_measured(Arena.on_free_ports(OUT / "soak-arena.log", "rinha-soak-", lb=lb, limits=True,
                                             env={"PURGE_TOKEN": secrets.token_hex(8)}), log)
    try:
        arena.reset_peak_memory()
        log(f"k6: {rate} payments/s for {duration_s:g} s, one row per {slice_s:g} s "
            f"(log {OUT / 'soak-k6.log'})")
        sampler = memory_sampler(arena, slice_s)
        sampler.start()
        try:
            k6 = run_soak_k6(arena, rate, duration_s, slice_s, OUT)
        finally:
            sampler.stop(final=True)
        drained, _ = arena.wait_drained(DRAIN_TIMEOUT_S, poll_s=0.5)
        status, body = http_request(arena.url, "GET", "/payments-summary", timeout=10.0)
        summary = json.loads(body) if status == 200 else None
    finally:
        arena.stop()
    ok = k6["total"]["requests"] - k6["total"]["failed"]
    stored = (summary["default"]["totalRequests"] + summary["fallback"]["totalRequests"]) if summary else None
    return {"duration_s": duration_s, "rate": rate, "slice_s": slice_s, "lb": arena.lb,
            "limits": arena.limits_applied, "limits_reason": arena.limits_reason,
            "k6": k6, "samples": sampler.samples, "drain_s": drained,
            "successful_posts": ok, "backend_payments": stored,
            "lag": None if stored is None else ok - stored}


def render(result, command):
    """The RESULTS.md section for one soak."""
    k6, samples = result["k6"], result["samples"]
    first, last = samples[0], samples[-1]
    total = k6["total"]
    when = now()
    limits = "1.5 CPU / 350 MB cgroup" if result["limits"] else f"no limits ({result['limits_reason']})"
    lines = [
        f"### Soak {when} UTC, {git_commit()}, `{command}`",
        "",
        f"{machine()}; lb {result['lb']}; {limits}; {result['rate']} payments/s for "
        f"{result['duration_s']:g} s: {total['requests']} requests, p99 {fmt(total['p99_ms'], '.2f')} ms, "
        f"max {fmt(total['max_ms'], '.0f')} ms, failed {total['failed']}, dropped by k6 {total['dropped']}; "
        f"lag after the drain {fmt(result['lag'], 'd')} "
        f"(drained in {fmt(result['drain_s'], '.1f')} s).",
        "",
        "| process | RSS at start MB | RSS at end MB | restarts |",
        "| --- | --- | --- | --- |",
    ]
    for name in PROCESS_NAMES:
        lines.append(f"| {name} | {fmt(first[f'{name}_rss_mb'], '.1f')} | {fmt(last[f'{name}_rss_mb'], '.1f')} | "
                     f"{fmt(last[f'{name}_restarts'], 'd')} |")
    lines.append(f"| cgroup (lb + instances) | {fmt(first['cgroup_mb'], '.1f')} | {fmt(last['cgroup_mb'], '.1f')} "
                 f"(peak {fmt(last['cgroup_peak_mb'], '.1f')}) | |")
    lines += [
        "",
        f"| slice (s) | requests | p99 ms | max ms | failed | "
        + " | ".join(f"{n} RSS MB" for n in PROCESS_NAMES) + " | "
        + " | ".join(f"{n} journal MB" for n in INSTANCES) + " |",
        "| --- " * (5 + len(PROCESS_NAMES) + len(INSTANCES)) + "|",
    ]
    slice_s = result["slice_s"]
    for i, figures in enumerate(k6["slices"]):
        sample = samples[min(i + 1, len(samples) - 1)]   # taken at the end of the slice
        lines.append(
            f"| {i * slice_s:g}-{min((i + 1) * slice_s, result['duration_s']):g} | {figures['requests']} | "
            f"{fmt(figures['p99_ms'], '.2f')} | {fmt(figures['max_ms'], '.0f')} | {figures['failed']} | "
            + " | ".join(fmt(sample[f"{n}_rss_mb"], ".1f") for n in PROCESS_NAMES) + " | "
            + " | ".join(fmt(sample[f"{n}_journal_mb"], ".2f") for n in INSTANCES) + " |")
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
    parser.add_argument("--no-record", action="store_true", help="print the section, do not insert it")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.rate < 1 or args.slice < 1:
        parser.error("--duration, --rate and --slice must be at least 1")
    command = "make soak" if not (argv or sys.argv[1:]) else "python -m bench.soak " + " ".join(
        argv if argv is not None else sys.argv[1:])
    try:
        result = soak(args.duration, args.rate, args.slice, args.lb)
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        log(f"failed: {error}")
        return 1
    (OUT / "soak-result.json").write_text(json.dumps(result, indent=2) + "\n")
    section = render(result, command)
    print(section)
    if not args.no_record:
        record(section)
        log(f"inserted into {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
