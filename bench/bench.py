#!/usr/bin/env python3
"""Benchmark the project and append one row to bench/RESULTS.md: `make bench`.

Two measurements, both optional:

1. The contest scenario under the contest's limits: bench/arena.py's Arena starts the whole
   stack (load balancer + two rinha.py instances in one cgroup limited to 1.5 CPU / 350 MB,
   emulators outside it) on free ports, bench/load.py runs k6 with bench/rinha.js against it,
   the stack stops. Recorded: score, p99, lag, inconsistencies, payments per processor, failed
   POSTs, the CPU seconds the cgroup used during the load (cpuacct) and per successful POST,
   the throttled CFS periods, the cgroup's peak memory.
2. A hot-path micro-benchmark: one rinha.py instance on a TCP port with no workers (the front
   alone: parse, validate, journal, queue; forwarding is in the scenario's CPU figure) and
   bench/micro_app.py (the same endpoint in Starlette on uvicorn), each
   loaded by wrk with unique payments for a fixed time and connection count, alternated
   (rinha, starlette, rinha, starlette, ...). For each run: requests answered 2xx divided by the
   server process's CPU seconds during the run (/proc/<pid>/stat utime+stime); the median of
   each and the ratio are recorded.

    python bench/bench.py [--lb haproxy|nginx] [--max-requests 550] [--duration 60]
                          [--phases bench/phases/contest.json] [--skip-load] [--skip-micro]
                          [--micro-seconds 5] [--micro-connections 50] [--micro-rounds 3]
                          [--no-record]

Output files go to bench/out/ (bench-*.log, result.json, report.html).
"""
import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from load import LoadError, arena_targets, run_load, summary_line  # noqa: E402

OUT = BENCH / "out"
RESULTS = BENCH / "RESULTS.md"
RINHA = REPO / "rinha.py"
PROCESSOR = BENCH / "processor.py"
MICRO_APP = BENCH / "micro_app.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")

WRK_SCRIPT = r"""
-- POST /payments with a unique correlationId per request (tag from the command line,
-- thread number, counter), then one line of JSON with the figures bench.py needs.
local threads = {}
function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end
function init(args)
  tag = tonumber(args[1] or "0", 16) or 0
  counter = 0
end
function request()
  counter = counter + 1
  local id = string.format("%08x-%04x-4000-8000-%012x", tag, tid, counter)
  return wrk.format("POST", "/payments", {["Content-Type"] = "application/json"},
                    '{"correlationId":"' .. id .. '","amount":19.90}')
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

def log(message):
    print(f"bench: {message}", flush=True)


def git_commit():
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def machine():
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} x {model}"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port, proc, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout:.0f}s")


def process_cpu_s(pid):
    """utime + stime of a process (all its threads), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


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
    from arena import Arena, ArenaError  # bench/arena.py (helper B)

    purge_token = secrets.token_hex(8)
    run_dir = Path(tempfile.mkdtemp(prefix="rinha-bench-"))
    arena_log = open(OUT / "bench-arena.log", "w")

    def output(line):
        arena_log.write(line + "\n")
        arena_log.flush()

    arena = Arena(lb_port=0, default_port=0, fallback_port=0, run_dir=run_dir, lb=args.lb, limits=True,
                  env={"PURGE_TOKEN": purge_token}, output=output)
    log(f"starting the stack (lb={arena.lb}, limits 1.5 CPU / 350 MB; log {arena_log.name})")
    try:
        arena.start()
    except ArenaError as error:
        arena_log.close()
        raise RuntimeError(f"the stack did not start: {error}") from None
    try:
        if not arena.limits_applied:
            log(f"WARNING: resource limits not applied ({arena.limits_reason}); CPU/memory columns are empty")
        arena.reset_peak_memory()
        before = arena.stats()
        overrides = {
            **arena_targets(arena, purge_token),
            "MAX_REQUESTS": args.max_requests,
            "DURATION_S": args.duration,
            "PHASES": args.phases,
        }
        log(f"k6: {args.max_requests} VUs over {args.duration:g} s, phases {args.phases} "
            f"(log {OUT / 'bench-k6.log'})")
        result = run_load(overrides, OUT, log_path=OUT / "bench-k6.log")
        after = arena.stats()
    finally:
        arena.stop()
        arena_log.close()
        shutil.rmtree(run_dir, ignore_errors=True)
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
    script = tmp / "payments.lua"
    script.write_text(WRK_SCRIPT)
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
        micro = start("micro_app", [python, str(MICRO_APP), "--port", str(micro_port)])
        wait_port(micro_port, micro, "micro_app.py")
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

def fmt(value, spec="", missing="-"):
    return missing if value is None else format(value, spec)


def make_row(command, result, stack, micro):
    cells = [
        datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lb", default=os.environ.get("LB") or None, choices=["haproxy", "nginx"],
                        help="load balancer of the stack (default: $LB, else the arena's default)")
    parser.add_argument("--max-requests", type=int, default=int(os.environ.get("MAX_REQUESTS") or 550))
    parser.add_argument("--duration", type=float, default=float(os.environ.get("DURATION_S") or 60))
    parser.add_argument("--phases", default=os.environ.get("PHASES") or "bench/phases/contest.json")
    parser.add_argument("--skip-load", action="store_true", help="no contest scenario")
    parser.add_argument("--skip-micro", action="store_true", help="no hot-path micro-benchmark")
    parser.add_argument("--micro-seconds", type=int, default=5, help="length of each wrk run")
    parser.add_argument("--micro-connections", type=int, default=50, help="wrk connections")
    parser.add_argument("--micro-rounds", type=int, default=3, help="rinha/starlette pairs (median reported)")
    parser.add_argument("--no-record", action="store_true", help="print the row, do not append it")
    args = parser.parse_args(argv)
    if args.skip_load and args.skip_micro:
        parser.error("nothing to do with both --skip-load and --skip-micro")
    if not RINHA.exists():
        log(f"{RINHA} does not exist")
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    command = "make bench" if not (argv or sys.argv[1:]) else "python bench/bench.py " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    result = stack = micro = None
    failed = False
    if not args.skip_load:
        try:
            result, stack = run_scenario(args)
            log(summary_line(result))
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
    if result is None and micro is None:
        return 1
    row = make_row(command, result, stack or {}, micro)
    print(row)
    if not args.no_record:
        with open(RESULTS, "a") as results:
            results.write(row + "\n")
        log(f"appended to {RESULTS.relative_to(REPO)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
