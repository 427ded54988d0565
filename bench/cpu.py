#!/usr/bin/env python3
"""CPU per payment, per process, at a fixed arrival rate: `python -m bench.cpu`.

Starts the native stack (bench/arena.py, limits as in the contest), lets it idle for
--idle-s to measure what each process spends doing nothing, then offers --rate payments per
second for --seconds (bench/capacity.js with one step), waits until both instances have
forwarded everything, and reports, for the load balancer and
each instance, user and system CPU per payment with the idle rate subtracted. Meant for A/B
comparisons of one change (run it from each worktree, alternated); it appends nothing to
bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.arena import Arena
from bench.capacity import run_capacity
from bench.common import cpu_times, voluntary_switches

DRAIN_TIMEOUT_S = 30.0         # bound on the wait for what was accepted to be forwarded


def cpu_of(pid):
    """(user s, system s, voluntary context switches) of one process."""
    return (*cpu_times(pid), voluntary_switches(pid))


def snapshot(pids):
    return {name: cpu_of(pid) for name, pid in pids.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=400, help="payments per second offered")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long the rate is held")
    parser.add_argument("--idle-s", type=float, default=10.0, help="idle measurement before the load")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the instances (repeatable)")
    args = parser.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    with tempfile.TemporaryDirectory(prefix="rinha-cpu-") as run_dir:
        arena = Arena(lb_port=0, default_port=0, fallback_port=0, run_dir=run_dir, output=False, env=env)
        with arena:
            pids = {name: child.pid for name, child in arena.children.items() if child.kind != "processor"}
            time.sleep(2.0)
            before_idle = snapshot(pids)
            time.sleep(args.idle_s)
            after_idle = snapshot(pids)
            settings = {"START_RATE": args.rate, "STEP_RATE": 0, "STEPS": 1, "STEP_S": args.seconds,
                        "MAX_VUS": 500}
            started = time.monotonic()
            result = run_capacity(arena.url, Path(run_dir) / "cpu.json", Path(run_dir) / "k6.log", settings)
            drained = time.monotonic()
            arena.wait_drained(DRAIN_TIMEOUT_S)  # what was accepted is forwarded before the CPU is read
            drain_s = time.monotonic() - drained
            elapsed = time.monotonic() - started
            after_load = snapshot(pids)
    step = result["steps"][0]
    payments = step["requests"] * (1 + 1 / args.seconds)  # the 1 s ramp offers half a second more
    print(f"cpu: {args.rate}/s for {args.seconds:g} s: {step['requests']} payments in the step, p99 "
          f"{step['p99_ms']:.2f} ms, failed {step['failed']}; drained {drain_s:.2f} s after; idle "
          f"subtracted over {elapsed:.1f} s")
    total = 0.0
    for name in pids:
        idle = [(b - a) / args.idle_s for a, b in zip(before_idle[name], after_idle[name])]
        load = [(c - b) - rate * elapsed for b, c, rate in zip(after_idle[name], after_load[name], idle)]
        user, system = (1e6 * value / payments for value in load[:2])
        total += user + system
        print(f"cpu: {name:14s} user {user:6.1f} us  sys {system:6.1f} us  per payment; "
              f"{load[2] / payments:4.2f} switches/payment; idle {1000 * (idle[0] + idle[1]):.1f} ms/s")
    print(f"cpu: total {total:.1f} us per payment")


if __name__ == "__main__":
    main()
