#!/usr/bin/env python3
"""Benchmark the project and append one row to bench/RESULTS.md: `make bench`.

Three measurements, each optional:

1. The contest scenario under the contest's limits: bench/arena.py's Arena starts the whole
   stack (load balancer + two rinha.py instances in one cgroup limited to 1.5 CPU / 350 MB,
   emulators outside it) on free ports, bench/load.py runs k6 with bench/rinha.js against it,
   the stack stops. Recorded: score, p99, lag, inconsistencies, payments per processor, failed
   POSTs, the CPU seconds the cgroup used during the load (cpuacct) and per successful POST,
   the throttled CFS periods, the cgroup's peak memory.
2. A hot-path micro-benchmark: one rinha.py instance on a TCP port with no workers (the front
   alone: parse, validate, journal, queue; forwarding is in the scenario's CPU figure) and
   bench/floors.py's micro app (the same endpoint in Starlette on uvicorn), each
   loaded by wrk with unique payments for a fixed time and connection count, alternated
   (rinha, starlette, rinha, starlette, ...). For each run: requests answered 2xx divided by the
   server process's CPU seconds during the run (/proc/<pid>/stat utime+stime); the median of
   each and the ratio are recorded.
3. Capacity (--capacity, or CAPACITY=1; off by default): bench/capacity.py offers POST /payments
   at a rising constant rate, first to the floor (haproxy alone answering 202, limited like the
   stack), then to a fresh stack under the limits, and records the highest rate each sustains
   with p99 under 10 ms and no failed request (a row in RESULTS.md's capacity table).

The scenario also records its trace (bench/tailtrace.py; --no-trace or TRACE=0 to skip): POST
/payments p50/p99/max per second as k6 saw it, each process's CPU, the cgroup's throttling and
each instance's event-loop lag and queue, drawn as bench/out/trace.png.

    python -m bench.bench [--lb haproxy|nginx] [--max-requests 550] [--duration 60]
                          [--phases bench/phases/contest.json] [--amounts fixed|random]
                          [--skip-load] [--skip-micro] [--no-trace] [--capacity]
                          [--capacity-start-rate 500] [--capacity-step-rate 500]
                          [--capacity-steps 12] [--capacity-step-s 5]
                          [--micro-seconds 5] [--micro-connections 50] [--micro-rounds 3]
                          [--no-record]

Output files go to bench/out/ (bench-*.log, result.json, report.html, trace.png,
capacity-*.json).
"""
import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.arena import Arena, ArenaError, start_measured
from bench.capacity import CapacityError, capacity_line, run_capacity
from bench.common import BENCH, OUT, PROCESSOR, REPO, RINHA, free_port, process_cpu_s, wait_port
from bench.floors import MICRO_APP, FloorServer
from bench.load import LoadError, arena_targets, run_load, summary_line
from bench.oracle import oracle_line
from bench.results import RESULTS, fmt, git_commit, insert_row, machine, now
from bench.tailtrace import arena_targets as trace_targets

# The header lines of RESULTS.md's tables: rows go after the last row of their table.
BENCH_HEADER = ("| date (UTC) | commit | command | machine | score | p99 ms | lag | incons. | default / fallback | "
                "failed POSTs | CPU s | CPU ms/pay | throttled | peak MB | rinha req/CPU-s | starlette req/CPU-s | "
                "ratio |")
CAPACITY_HEADER = ("| date (UTC) | commit | command | machine | steps | floor req/s | floor p99 ms | floor CPU ms/req | "
                   "rinha req/s | rinha p99 ms | rinha CPU ms/req | rinha / floor |")
CAPACITY_SECTION = """## Capacity

Rows are added by `make bench CAPACITY=1` (`python -m bench.bench --capacity`). bench/capacity.js offers
POST /payments (unique payments, 19.90) at a constant rate in steps (k6 `ramping-arrival-rate`: each
step ramps for 1 s, then holds its rate; only the hold counts), first to the **floor** (haproxy alone,
haproxy.cfg's settings, answering a fixed 202 with nothing behind it), then to a fresh stack (load
balancer + two rinha.py instances, emulators healthy with no delay), each in a cgroup limited to
1.5 CPU / 350 MB.

- **steps**: first rate, step, number of steps, seconds each holds (`start+step×n, s`).
- **req/s**: the highest rate sustained, with every lower step sustained too: k6 completed at least
  98 % of the offered requests, none failed (non-2xx or 1.5 s timeout), p99 under 10 ms.
- **p99 ms**: the p99 of that step. **CPU ms/req**: the cgroup's CPU over the whole ramp per request.
"""
WRK_SCRIPT = BENCH / "payments.lua"


def log(message):
    print(f"bench: {message}", flush=True)


def stop_process(proc, timeout=15.0):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# ---------------------------------------------------------------------------
# 1. The contest scenario under the limits
# ---------------------------------------------------------------------------

def run_scenario(args):
    purge_token = secrets.token_hex(8)
    arena = start_measured(Arena.on_free_ports(OUT / "bench-arena.log", "rinha-bench-", lb=args.lb, limits=True,
                                               env={"PURGE_TOKEN": purge_token}),
                           log, unlimited="; CPU/memory columns are empty")
    try:
        arena.reset_peak_memory()
        before = arena.stats()
        overrides = {
            **arena_targets(arena, purge_token),
            "MAX_REQUESTS": args.max_requests,
            "DURATION_S": args.duration,
            "PHASES": args.phases,
            "AMOUNTS": args.amounts,
        }
        log(f"k6: {args.max_requests} VUs over {args.duration:g} s, phases {args.phases}, amounts {args.amounts} "
            f"(log {OUT / 'bench-k6.log'})")
        targets = None if args.no_trace else trace_targets(arena)
        result = run_load(overrides, OUT, log_path=OUT / "bench-k6.log", trace_targets=targets,
                          trace_title=f"make bench at {git_commit()}: {Path(args.phases).name}, "
                                      f"{args.max_requests} VUs, {args.amounts} amounts")
        after = arena.stats()
    finally:
        arena.stop()
    stack = {"limits": arena.limits_applied, "limits_reason": arena.limits_reason, "lb": arena.lb}
    if arena.limits_applied and before.get("cpu_usage_s") is not None:
        cpu = after["cpu_usage_s"] - before["cpu_usage_s"]
        stack.update({
            "cpu_s": cpu,
            "cpu_ms_per_payment": cpu * 1000 / result["successful_posts"] if result["successful_posts"] else None,
            "throttled_periods": after["nr_throttled"] - before["nr_throttled"],
            "periods": after["nr_periods"] - before["nr_periods"],
            "throttled_s": after["throttled_time_s"] - before["throttled_time_s"],
            "peak_memory_mb": after["memory_max_usage_bytes"] / (1 << 20),
        })
    return result, stack


# ---------------------------------------------------------------------------
# 2. The hot-path micro-benchmark
# ---------------------------------------------------------------------------

def run_wrk(port, seconds, connections, script, log_file):
    tag = secrets.token_hex(4)
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", str(script),
               f"http://127.0.0.1:{port}/payments", "--", tag]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    log_file.write(f"$ {shlex.join(command)}\n{proc.stdout}{proc.stderr}\n")
    log_file.flush()
    for line in proc.stdout.splitlines():
        if line.startswith("WRK_RESULT "):
            return json.loads(line[len("WRK_RESULT "):])
    raise RuntimeError(f"wrk gave no result (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")


def run_micro(args):
    if not shutil.which("wrk"):
        raise RuntimeError("wrk is not installed (apt-get install -y wrk)")
    python = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="rinha-micro-"))
    script = WRK_SCRIPT
    log_file = open(OUT / "bench-micro.log", "w")
    procs = []

    def start(name, argv, env=None):
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    try:
        processor_ports = []
        for fee in ("0.05", "0.15"):
            port = free_port()
            proc = start("processor", [python, str(PROCESSOR), "--port", str(port), "--fee", fee])
            wait_port(port, proc, "processor emulator")
            processor_ports.append(port)
        rinha_port, micro_port = free_port(), free_port()
        env = dict(os.environ)
        env.update({
            "LISTEN": f"127.0.0.1:{rinha_port}", "INSTANCE_ID": "micro", "PEERS": "",
            "DEFAULT_PROCESSOR_URL": f"http://127.0.0.1:{processor_ports[0]}",
            "FALLBACK_PROCESSOR_URL": f"http://127.0.0.1:{processor_ports[1]}",
            "JOURNAL_PATH": str(tmp / "micro.journal"),
            # The front alone, as the Starlette app does: accept, validate, journal, queue.
            # Nothing is forwarded during the measurement (forwarding is in the scenario's CPU).
            "IN_FLIGHT_CAP": "0", "QUEUE_CAPACITY": "1000000", "HEALTH_INTERVAL_S": "0",
        })
        rinha = start("rinha", [python, str(RINHA)], env)
        wait_port(rinha_port, rinha, "rinha.py")
        micro = start("micro_app", [python, *MICRO_APP, "--port", str(micro_port)])
        wait_port(micro_port, micro, "the micro app")
        servers = [("rinha", rinha, rinha_port), ("starlette", micro, micro_port)]
        for name, proc, port in servers:  # warm-up, not measured
            run_wrk(port, 1, args.micro_connections, script, log_file)
        runs = {"rinha": [], "starlette": []}
        for round_ in range(args.micro_rounds):
            for name, proc, port in servers:
                cpu0 = process_cpu_s(proc.pid)
                wrk = run_wrk(port, args.micro_seconds, args.micro_connections, script, log_file)
                cpu1 = process_cpu_s(proc.pid)
                ok = wrk["requests"] - wrk["status"]
                runs[name].append({"ok": ok, "cpu_s": cpu1 - cpu0, "per_cpu_s": ok / max(cpu1 - cpu0, 1e-9),
                                   "wall_rps": ok / (wrk["duration_us"] / 1e6), "p99_ms": wrk["p99_us"] / 1000,
                                   "errors": {k: wrk[k] for k in ("connect", "read", "write", "status", "timeout")}})
                run = runs[name][-1]
                log(f"micro round {round_ + 1} {name:9}: {run['ok']} x 2xx in {args.micro_seconds} s, "
                    f"{run['cpu_s']:.2f} CPU s -> {run['per_cpu_s']:.0f} req/CPU-s "
                    f"({run['wall_rps']:.0f} req/s, p99 {run['p99_ms']:.2f} ms)")
        rinha_median = statistics.median(r["per_cpu_s"] for r in runs["rinha"])
        micro_median = statistics.median(r["per_cpu_s"] for r in runs["starlette"])
        return {
            "rinha_per_cpu_s": rinha_median,
            "starlette_per_cpu_s": micro_median,
            "ratio": rinha_median / micro_median,
            "starlette_http": uvicorn_http_impl(),
            "runs": runs,
        }
    finally:
        for proc in reversed(procs):
            stop_process(proc)
        log_file.close()
        shutil.rmtree(tmp, ignore_errors=True)


def uvicorn_http_impl():
    """Which HTTP parser uvicorn picks here ('auto': httptools when installed, else h11)."""
    try:
        import httptools  # noqa: F401  (only whether it imports)
        return "httptools"
    except ImportError:
        return "h11"


# ---------------------------------------------------------------------------
# The row
# ---------------------------------------------------------------------------

def make_row(command, result, stack, micro):
    cells = [
        now(),
        git_commit(),
        f"`{command}`",
        machine(),
    ]
    if result:
        limits = "" if stack.get("limits") else " (no limits)"
        cells += [
            f"{result['score']:,.2f}{limits}",
            fmt(result["p99"], ".2f"),
            str(result["lag"]),
            str(result["inconsistencies"]),
            f"{result['default']['totalRequests']} / {result['fallback']['totalRequests']}",
            str(result["failed_posts"]),
            fmt(stack.get("cpu_s"), ".1f"),
            fmt(stack.get("cpu_ms_per_payment"), ".2f"),
            fmt(stack.get("throttled_periods")),
            fmt(stack.get("peak_memory_mb"), ".0f"),
        ]
    else:
        cells += ["-"] * 10
    if micro:
        cells += [
            f"{micro['rinha_per_cpu_s']:,.0f}",
            f"{micro['starlette_per_cpu_s']:,.0f} ({micro['starlette_http']})",
            f"{micro['ratio']:.2f}",
        ]
    else:
        cells += ["-"] * 3
    return "| " + " | ".join(cells) + " |"


# ---------------------------------------------------------------------------
# 3. Capacity: the floor and the stack, in one session
# ---------------------------------------------------------------------------

def run_capacity_pair(args):
    settings = {"START_RATE": args.capacity_start_rate, "STEP_RATE": args.capacity_step_rate,
                "STEPS": args.capacity_steps, "STEP_S": args.capacity_step_s}
    timeout = (args.capacity_step_s + 1) * args.capacity_steps + 120
    out = {}
    log(f"capacity: floor (haproxy answering 202), {args.capacity_steps} steps of {args.capacity_step_s:g} s "
        f"from {args.capacity_start_rate}/s by {args.capacity_step_rate}/s (log {OUT / 'capacity-floor-k6.log'})")
    floor = FloorServer(log=log).start()
    try:
        cpu0 = floor.cpu_s()
        result = run_capacity(floor.url, OUT / "capacity-floor.json", OUT / "capacity-floor-k6.log", settings, timeout)
        cpu1 = floor.cpu_s()
        result["limits"] = floor.limits_reason
    finally:
        floor.stop()
    result["cpu_s"] = None if cpu0 is None else cpu1 - cpu0
    out["floor"] = result
    log(capacity_line("floor", result))
    arena = Arena.on_free_ports(OUT / "capacity-arena.log", "rinha-cap-", lb=args.lb, limits=True,
                                env={"PURGE_TOKEN": secrets.token_hex(8)})
    log(f"capacity: rinha (fresh stack; log {OUT / 'capacity-rinha-k6.log'})")
    try:
        arena.start()
        before = arena.stats()["cpu_usage_s"]
        result = run_capacity(arena.url, OUT / "capacity-rinha.json", OUT / "capacity-rinha-k6.log", settings, timeout)
        after = arena.stats()["cpu_usage_s"]
        result["limits"] = arena.limits_reason
        result["cpu_s"] = None if before is None else after - before
    except (ArenaError, CapacityError) as error:
        raise RuntimeError(f"capacity of the stack: {error}") from None
    finally:
        arena.stop()
    out["rinha"] = result
    log(capacity_line("rinha", result))
    out["settings"] = settings
    (OUT / "capacity.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def capacity_row(command, capacity):
    def cells(result):
        requests = sum(step["requests"] for step in result["steps"])
        cpu = result.get("cpu_s")
        return [f"{result['sustained_rate']:,}", fmt(result["p99_at_sustained_ms"], ".2f"),
                fmt(None if cpu is None or not requests else cpu * 1000 / requests, ".3f")]
    settings = capacity["settings"]
    floor, rinha = capacity["floor"], capacity["rinha"]
    ratio = rinha["sustained_rate"] / floor["sustained_rate"] if floor["sustained_rate"] else None
    return "| " + " | ".join([
        now(), git_commit(), f"`{command}`", machine(),
        f"{settings['START_RATE']}+{settings['STEP_RATE']}×{settings['STEPS']}, {settings['STEP_S']:g} s",
        *cells(floor), *cells(rinha), fmt(ratio, ".2f")]) + " |"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lb", default=os.environ.get("LB") or None, choices=["haproxy", "nginx"],
                        help="load balancer of the stack (default: $LB, else the arena's default)")
    parser.add_argument("--max-requests", type=int, default=int(os.environ.get("MAX_REQUESTS") or 550))
    parser.add_argument("--duration", type=float, default=float(os.environ.get("DURATION_S") or 60))
    parser.add_argument("--phases", default=os.environ.get("PHASES") or "bench/phases/contest.json")
    parser.add_argument("--amounts", default=os.environ.get("AMOUNTS") or "fixed", choices=["fixed", "random"])
    parser.add_argument("--no-trace", action="store_true", default=os.environ.get("TRACE", "1") in ("0", ""),
                        help="do not record the per-second trace ($TRACE=0)")
    parser.add_argument("--capacity", action="store_true", default=os.environ.get("CAPACITY", "") not in ("", "0"),
                        help="also measure the capacity of the floor and of the stack ($CAPACITY=1)")
    parser.add_argument("--capacity-start-rate", type=int, default=500, help="first step, requests per second")
    parser.add_argument("--capacity-step-rate", type=int, default=500, help="increase per step")
    parser.add_argument("--capacity-steps", type=int, default=12)
    parser.add_argument("--capacity-step-s", type=float, default=5, help="seconds each step holds its rate")
    parser.add_argument("--skip-load", action="store_true", help="no contest scenario")
    parser.add_argument("--skip-micro", action="store_true", help="no hot-path micro-benchmark")
    parser.add_argument("--micro-seconds", type=int, default=5, help="length of each wrk run")
    parser.add_argument("--micro-connections", type=int, default=50, help="wrk connections")
    parser.add_argument("--micro-rounds", type=int, default=3, help="rinha/starlette pairs (median reported)")
    parser.add_argument("--no-record", action="store_true", help="print the row, do not append it")
    args = parser.parse_args(argv)
    if args.skip_load and args.skip_micro and not args.capacity:
        parser.error("nothing to do with both --skip-load and --skip-micro (and no --capacity)")
    if not RINHA.exists():
        log(f"{RINHA} does not exist")
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    command = "make bench" if not (argv or sys.argv[1:]) else "python -m bench.bench " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    result = stack = micro = None
    failed = False
    if not args.skip_load:
        try:
            result, stack = run_scenario(args)
            log(summary_line(result))
            log(oracle_line(result))
            if result.get("trace"):
                log(f"{result['trace']['line']}; picture {result['trace']['png']}")
            if stack.get("cpu_s") is not None:
                log(f"stack: {stack['cpu_s']:.1f} CPU s ({stack['cpu_ms_per_payment']:.2f} ms per payment), "
                    f"throttled {stack['throttled_periods']}/{stack['periods']} periods "
                    f"({stack['throttled_s']:.2f} s), peak memory {stack['peak_memory_mb']:.0f} MB")
        except (LoadError, RuntimeError) as error:
            log(f"scenario failed: {error}")
            failed = True
    if not args.skip_micro:
        try:
            micro = run_micro(args)
            log(f"micro: rinha {micro['rinha_per_cpu_s']:,.0f} req/CPU-s, starlette "
                f"{micro['starlette_per_cpu_s']:,.0f} req/CPU-s ({micro['starlette_http']}): "
                f"ratio {micro['ratio']:.2f}")
            (OUT / "bench-micro.json").write_text(json.dumps(micro, indent=2) + "\n")
        except (RuntimeError, OSError, subprocess.SubprocessError) as error:
            log(f"micro-benchmark failed: {error}")
            failed = True
    capacity = None
    if args.capacity:
        try:
            capacity = run_capacity_pair(args)
        except Exception as error:  # noqa: BLE001 - reported, and the other rows are still recorded
            log(f"capacity failed: {error}")
            failed = True
    if result is None and micro is None and capacity is None:
        return 1
    rows = []
    if result is not None or micro is not None:
        rows.append((make_row(command, result, stack or {}, micro), BENCH_HEADER, ""))
    if capacity is not None:
        rows.append((capacity_row(command, capacity), CAPACITY_HEADER, CAPACITY_SECTION))
    for row, header, section in rows:
        print(row)
        if not args.no_record:
            insert_row(row, header, section)
    if rows and not args.no_record:
        log(f"recorded in {RESULTS.relative_to(REPO)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
