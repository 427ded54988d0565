#!/usr/bin/env python3
"""The contest's k6 script against the floor: `python bench/floor.py`.

The floor is haproxy alone answering every request with a fixed 202 (bench/capacity.py's
FloorServer: haproxy.cfg's global and defaults sections, limited like the stack), so the run
measures what k6, haproxy and this machine cost with nothing behind the load balancer. The
processors' emulators run only so that the script's admin calls are answered. Prints the p99
of the run as the contest computes it and the floor's CPU per request; run it alternated with
`python bench/bench.py --skip-micro --no-record` to compare rinha with the floor. Appends
nothing to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from arena import PROCESSOR, free_port  # noqa: E402
from capacity import FloorServer  # noqa: E402
from load import run_load  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-requests", type=int, default=550, help="VUs reached at the end of the ramp")
    args = parser.parse_args(argv)
    ports = {"0.05": free_port(), "0.15": free_port()}
    processors = [subprocess.Popen([sys.executable, str(PROCESSOR), "--port", str(port), "--fee", fee,
                                    "--token", "123"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                  for fee, port in ports.items()]
    floor = FloorServer(log=lambda *_: None).start()
    try:
        time.sleep(1.0)
        with tempfile.TemporaryDirectory(prefix="rinha-floor-load-") as out:
            before = floor.cpu_s()
            result = run_load({"BACKEND_URL": floor.url, "MAX_REQUESTS": args.max_requests,
                               "DEFAULT_ADMIN_URL": f"http://127.0.0.1:{ports['0.05']}",
                               "FALLBACK_ADMIN_URL": f"http://127.0.0.1:{ports['0.15']}"},
                              out_dir=out, log_path=Path(out) / "k6.log", dashboard=False)
            cpu = floor.cpu_s() - before if before is not None else None
    finally:
        floor.stop()
        for process in processors:
            process.terminate()
            process.wait(10)
    requests = result["http_reqs"]
    per_request = f"{1000 * cpu / requests:.3f} ms" if cpu is not None else "unknown (no cgroup)"
    print(f"floor: {args.max_requests} VUs, p99 {result['p99']:.2f} ms, {requests} requests, "
          f"CPU {per_request} per request (limits: {floor.limits_reason})")


if __name__ == "__main__":
    main()
