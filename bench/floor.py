#!/usr/bin/env python3
"""The contest's k6 script against a floor, or against rinha measured the same way: `python -m bench.floor`.

--behind none (the default): haproxy alone answering every request with a fixed 202
(bench/floors.py's FloorServer: haproxy.cfg's global and defaults sections, limited like the
stack): what k6, haproxy and this machine cost with nothing behind the load balancer.
--behind null: the real stack's shape (bench/arena.py: haproxy.cfg, two instances on unix
sockets, one cgroup with the contest's limits) with bench/floors.py's null instance as the
instances, which answer at once and do nothing: what a Python instance costs before any of
rinha's work.
--behind rinha: the real stack, measured the same way.

The processors' emulators run in every case (for the script's admin calls, and for rinha).
Prints the p99 of the run as the contest computes it and the CPU of the limited cgroup per
request over the load only (start-up excluded; for rinha, also the forwarding that follows:
it waits until everything accepted is settled). Run the three alternated to compare them.
Appends nothing to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.arena import Arena
from bench.common import INSTANCES, PROCESSOR, RINHA, free_port
from bench.floors import NULL_INSTANCE, FloorServer
from bench.load import arena_targets, run_load

DRAIN_TIMEOUT_S = 30.0         # bound on the wait for what rinha accepted to be settled


def haproxy_alone(settings, out):
    """(k6 result, CPU seconds of the load or None) for haproxy answering 202 by itself."""
    ports = {"0.05": free_port(), "0.15": free_port()}
    processors = [subprocess.Popen([sys.executable, str(PROCESSOR), "--port", str(port), "--fee", fee,
                                    "--token", "123"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                  for fee, port in ports.items()]
    floor = FloorServer(log=lambda *_: None).start()
    try:
        time.sleep(1.0)
        before = floor.cpu_s()
        result = run_load({**settings, "BACKEND_URL": floor.url,
                           "DEFAULT_ADMIN_URL": f"http://127.0.0.1:{ports['0.05']}",
                           "FALLBACK_ADMIN_URL": f"http://127.0.0.1:{ports['0.15']}"},
                          out_dir=out, log_path=Path(out) / "k6.log", dashboard=False)
        return result, (floor.cpu_s() - before if before is not None else None)
    finally:
        floor.stop()
        for process in processors:
            process.terminate()
            process.wait(10)


def arena_stack(settings, out, command):
    """(k6 result, CPU seconds of the load or None) for the arena with `command` as its instances."""
    purge_token = secrets.token_hex(8)
    arena = Arena(lb_port=0, default_port=0, fallback_port=0, run_dir=Path(out) / "run", output=False,
                  env={"PURGE_TOKEN": purge_token}, instance_command=command)
    with arena:
        time.sleep(1.0)
        before = arena.stats()["cpu_usage_s"]
        result = run_load({**settings, **arena_targets(arena, purge_token)}, out_dir=out,
                          log_path=Path(out) / "k6.log", dashboard=False)
        if command != NULL_INSTANCE:
            arena.wait_drained(DRAIN_TIMEOUT_S)
        after = arena.stats()["cpu_usage_s"]
        cpu = after - before if arena.limits_applied and before is not None and after is not None else None
        if result.get("failed_posts"):  # what the stack said meanwhile
            for name in INSTANCES:
                for line in arena.tail(name)[-10:]:
                    print(f"floor: {name}: {line[:300]}")
    return result, cpu


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--behind", choices=("none", "null", "rinha"), default="none",
                        help="what haproxy has behind it (see above)")
    parser.add_argument("--max-requests", type=int, default=550, help="VUs reached at the end of the ramp")
    args = parser.parse_args(argv)
    settings = {"MAX_REQUESTS": args.max_requests}
    with tempfile.TemporaryDirectory(prefix="rinha-floor-load-") as out:
        if args.behind == "none":
            result, cpu = haproxy_alone(settings, out)
        else:
            result, cpu = arena_stack(settings, out, NULL_INSTANCE if args.behind == "null" else (RINHA,))
        if result.get("failed_posts"):  # what they were, as k6 saw them
            k6_log = (Path(out) / "k6.log").read_text(errors="replace").splitlines()
            for line in [line for line in k6_log if "level=warn" in line and "consistency" not in line][-10:]:
                print(f"floor: k6: {line[:300]}")
    requests = result["http_reqs"]
    per_request = f"{1000 * cpu / requests:.3f} ms" if cpu is not None else "unknown (no cgroup)"
    extra = (f", lag {result['lag']}, inconsistencies {result['inconsistencies']}, fallback "
             f"{result['fallback']['totalRequests']}, processors {result['default']['processorTotalRequests']}"
             f" / {result['fallback']['processorTotalRequests']}" if args.behind == "rinha" else "")
    print(f"floor: behind {args.behind}, {args.max_requests} VUs, p99 {result['p99']:.2f} ms, {requests} requests, "
          f"CPU {per_request} per request, failed POSTs {result['failed_posts']}{extra}")


if __name__ == "__main__":
    main()
