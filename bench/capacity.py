#!/usr/bin/env python3
"""Capacity: the highest constant rate of POST /payments a stack sustains.

bench/capacity.js offers a rising arrival rate in steps (k6's ramping-arrival-rate); a step
is sustained when, over the time it holds its rate, k6 completed at least
SUSTAINED_FRACTION of the offered requests, none failed (non-2xx or 1.5 s timeout) and their
p99 stayed under CAPACITY_P99_MS. The capacity is the rate of the highest step such that it
and every step below it were sustained.

The stack is compared with bench/floors.py's FloorServer: haproxy alone, configured as
haproxy.cfg (same global and defaults sections) but answering a fixed 202 itself, with nothing
behind it, in a cgroup limited like the stack (1.5 CPU / 350 MB) when the limits can be applied.

`python -m bench.bench --capacity` runs both in one session (`make bench CAPACITY=1`);
`python -m bench.capacity --url http://localhost:9999` measures a running stack alone.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.common import BENCH, OUT, run_k6
from bench.floors import FloorError, FloorServer

SCRIPT = BENCH / "capacity.js"
CAPACITY_P99_MS = 10.0        # a step whose p99 reaches this is not sustained
SUSTAINED_FRACTION = 0.98     # share of the offered requests k6 must have completed in a step
DEFAULTS = {"START_RATE": 500, "STEP_RATE": 500, "STEPS": 12, "STEP_S": 5, "MAX_VUS": 1000}


class CapacityError(RuntimeError):
    """k6 could not run the capacity test or wrote no result."""


def step_sustained(step, step_s):
    """Whether one step of capacity.js's result held its rate."""
    return (step["requests"] >= SUSTAINED_FRACTION * step["rate"] * step_s
            and step["failed"] == 0
            and step["p99_ms"] is not None and step["p99_ms"] < CAPACITY_P99_MS)


def sustained_rate(result):
    """(highest rate sustained with every lower step sustained too, its step) or (0, None)."""
    best, best_step = 0, None
    for step in result["steps"]:
        if not step_sustained(step, result["step_s"]):
            break
        best, best_step = step["rate"], step
    return best, best_step


def run_capacity(url, out_file, log_path, settings=None, timeout_s=None):
    """Run bench/capacity.js against url; return its result with "sustained_rate" added."""
    Path(out_file).unlink(missing_ok=True)
    run_k6(SCRIPT, {**DEFAULTS, **(settings or {}), "TARGET_URL": url, "OUT_FILE": out_file},
           log_path=log_path, timeout_s=timeout_s, error=CapacityError)
    if not Path(out_file).exists():
        raise CapacityError(f"k6 wrote no {out_file} (log: {log_path})")
    result = json.loads(Path(out_file).read_text())
    rate, step = sustained_rate(result)
    result["sustained_rate"] = rate
    result["p99_at_sustained_ms"] = step["p99_ms"] if step else None
    Path(out_file).write_text(json.dumps(result, indent=2) + "\n")
    return result


def capacity_line(name, result):
    steps = ", ".join(f"{s['rate']}: {'-' if s['p99_ms'] is None else format(s['p99_ms'], '.1f')} ms"
                      + (f"/{s['failed']} failed" if s["failed"] else "")
                      + ("" if step_sustained(s, result["step_s"]) else " X")
                      for s in result["steps"])
    return f"capacity {name}: {result['sustained_rate']}/s sustained (p99 < {CAPACITY_P99_MS:g} ms); steps {steps}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://localhost:9999", help="the stack to measure")
    parser.add_argument("--floor", action="store_true", help="measure haproxy answering 202 instead")
    parser.add_argument("--out-dir", default=str(OUT))
    for key, value in DEFAULTS.items():
        parser.add_argument("--" + key.lower().replace("_", "-"), type=float if key == "STEP_S" else int,
                            default=value)
    args = parser.parse_args(argv)
    settings = {key: getattr(args, key.lower()) for key in DEFAULTS}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    floor = None
    try:
        floor = FloorServer().start() if args.floor else None
        url = floor.url if floor else args.url
        result = run_capacity(url, out / "capacity.json", out / "capacity-k6.log", settings)
    except (CapacityError, FloorError) as error:
        print(f"capacity: {error}", file=sys.stderr)
        return 1
    finally:
        if floor:
            floor.stop()
    print(capacity_line("floor" if floor else url, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
