#!/usr/bin/env python3
"""Every schedule of bench/phases/, each on a fresh stack: `make scenarios`.

For each scenario, bench/arena.py starts a new stack (load balancer + two rinha.py instances
under the contest's 1.5 CPU / 350 MB, two processor emulators; a new run directory, so no
journal carries over), bench/load.py runs bench/rinha.js against it (the 60 s ramp to 550
VUs unless told otherwise), the stack stops, and a row goes to the scenarios table of
bench/RESULTS.md: score, the run's share of the oracle (bench/oracle.py), lag, payments per
processor, p99, inconsistencies, failed POSTs. The contest's schedule runs with its fixed
19.90; every other schedule with random amounts (0.01 to 10,000.00).

    python -m bench.scenarios [--only contest,default-never-recovers,...] [--max-requests 550]
                              [--duration 60] [--lb haproxy|nginx] [--trace] [--no-record]

Environment: SCENARIOS (as --only), MAX_REQUESTS, DURATION_S, LB, TRACE=1. Each run's files
(result.json, k6.log, arena.log, trace.png with --trace) go to bench/out/scenarios/<name>/.
"""
import argparse
import os
import secrets
import shlex
import shutil
import sys

from bench.arena import Arena, start_measured
from bench.common import OUT as BENCH_OUT, REPO
from bench.load import LoadError, arena_targets, run_load, summary_line
from bench.oracle import oracle_line
from bench.results import RESULTS, fmt, git_commit, insert_row, now
from bench.tailtrace import arena_targets as trace_targets

OUT = BENCH_OUT / "scenarios"
# (name, schedule, amounts): the contest's own first, then the schedules it does not test.
SCENARIOS = (
    ("contest", "bench/phases/contest.json", "fixed"),
    ("default-never-recovers", "bench/phases/default-never-recovers.json", "random"),
    ("default-flaky", "bench/phases/default-flaky.json", "random"),
    ("default-slow-300ms", "bench/phases/default-slow-300ms.json", "random"),
    ("default-slow-1000ms", "bench/phases/default-slow-1000ms.json", "random"),
    ("both-down-20-40", "bench/phases/both-down-20-40.json", "random"),
    ("fallback-down", "bench/phases/fallback-down.json", "random"),
    ("default-slow-2000ms", "bench/phases/default-slow-2000ms.json", "random"),
    ("default-alternating-1500ms", "bench/phases/default-alternating-1500ms.json", "random"),
    ("default-down-fallback-1000ms", "bench/phases/default-down-fallback-1000ms.json", "random"),
)
HEADER = ("| date (UTC) | commit | scenario | amounts | VUs, s | score | oracle | share | lag | "
          "default / fallback | p99 ms | incons. | failed POSTs |")
SECTION = """## Scenarios

Rows are added by `make scenarios` (`python -m bench.scenarios`): each schedule of bench/phases/ on a
fresh stack (new run directory: no journal carries over) under 1.5 CPU / 350 MB, bench/rinha.js ramping
to the VUs given over the seconds given. The contest's schedule with 19.90; the others with random
amounts (uniform whole cents, 0.01 to 10,000.00).

- **score**: as the contest computes it (p99 bonus and consistency fine included).
- **oracle**: the profit (gross − fees, no bonus or fine) a router that knew the schedule in advance
  would have made with the same accepted payments (bench/oracle.py; README explains the model).
  **share**: the run's gross − fees divided by the oracle.
- **lag**: successful POSTs − payments the backend reports. **default / fallback**: payments the
  backend reports per processor. **p99**: over every expected response of the test.
"""


def log(message):
    print(f"scenarios: {message}", flush=True)


def run_one(name, phases, amounts, args):
    """One scenario on a fresh stack; returns result.json's contents."""
    out = OUT / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    purge_token = secrets.token_hex(8)
    arena = start_measured(Arena.on_free_ports(out / "arena.log", "rinha-scn-", lb=args.lb, limits=True,
                                               env={"PURGE_TOKEN": purge_token}), log, error=LoadError,
                           announce=False)
    try:
        overrides = {**arena_targets(arena, purge_token), "MAX_REQUESTS": args.max_requests,
                     "DURATION_S": args.duration, "PHASES": phases, "AMOUNTS": amounts}
        timeout = args.duration + 180
        return run_load(overrides, out, log_path=out / "k6.log", dashboard=False, timeout_s=timeout,
                        trace_targets=trace_targets(arena) if args.trace else None,
                        trace_title=f"{name}: {args.max_requests} VUs, {amounts} amounts")
    finally:
        arena.stop()


def make_row(name, amounts, args, result):
    oracle = result.get("oracle") or {}
    share = oracle.get("share")
    return "| " + " | ".join([
        now(),
        git_commit(),
        name,
        amounts,
        f"{args.max_requests}, {args.duration:g}",
        f"{result['score']:,.2f}",
        fmt(oracle.get("profit"), ",.2f"),
        "-" if share is None else f"{share * 100:.1f} %",
        str(result["lag"]),
        f"{result['default']['totalRequests']} / {result['fallback']['totalRequests']}",
        fmt(result["p99"], ".2f"),
        str(result["inconsistencies"]),
        str(result["failed_posts"]),
    ]) + " |"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [name for name, _, _ in SCENARIOS]
    parser.add_argument("--only", default=os.environ.get("SCENARIOS") or "",
                        help=f"comma-separated subset of: {', '.join(names)}")
    parser.add_argument("--max-requests", type=int, default=int(os.environ.get("MAX_REQUESTS") or 550))
    parser.add_argument("--duration", type=float, default=float(os.environ.get("DURATION_S") or 60))
    parser.add_argument("--lb", default=os.environ.get("LB") or None, choices=["haproxy", "nginx"])
    parser.add_argument("--trace", action="store_true", default=os.environ.get("TRACE", "") not in ("", "0"),
                        help="also record each run's trace.png ($TRACE=1)")
    parser.add_argument("--no-record", action="store_true", help="print the rows, do not add them")
    args = parser.parse_args(argv)
    chosen = [n.strip() for n in args.only.split(",") if n.strip()] or names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"unknown scenarios {', '.join(unknown)}; known: {', '.join(names)}")
    command = shlex.join(["python", "-m", "bench.scenarios"] + (argv if argv is not None else sys.argv[1:]))
    failed = False
    for name, phases, amounts in SCENARIOS:
        if name not in chosen:
            continue
        log(f"{name}: {phases}, {amounts} amounts, {args.max_requests} VUs over {args.duration:g} s "
            f"(files in {OUT / name})")
        try:
            result = run_one(name, phases, amounts, args)
        except (LoadError, OSError) as error:
            log(f"{name} failed: {error}")
            failed = True
            continue
        log(f"{name}: {summary_line(result)}")
        log(f"{name}: {oracle_line(result)}")
        if result.get("trace"):
            log(f"{name}: {result['trace']['line']}")
        row = make_row(name, amounts, args, result)
        print(row, flush=True)
        if not args.no_record:
            insert_row(row, HEADER, SECTION)
    if not args.no_record:
        log(f"rows added to {RESULTS.relative_to(REPO)} ({command})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
