#!/usr/bin/env python3
"""The tail, second by second: what k6 saw and what the stack did at the same time.

A trace has two sources:

- k6's own per-request points (`--out csv=k6-points.csv`, restricted to the few system tags the
  scenario needs): the duration of every POST /payments with the time it ended;
- a Sampler thread in the runner that, once a second, reads each process's CPU time
  (/proc/<pid>/stat utime + stime: the load balancer and each instance), the stack's cgroup
  throttling (cpu.stat, when the limits are applied) and each instance's GET /health over its
  unix socket (its event-loop lag `loop_lag_ms` and `gc` when rinha.py reports them, its queue,
  and how long /health took to answer).

digest() turns both into one row per second of the test (p50 / p99 / max / count of POST
/payments, how many of the run's slowest 1 % fell in that second, CPU of each process, lag),
written to trace.json, and plot() draws it as trace.png (matplotlib, Agg) with the
processors' phases shaded. `python -m bench.tailtrace <out-dir>` redraws the picture from a
trace.json.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
import time
from pathlib import Path

from bench.common import INSTANCES, LB_SERVICE, PeriodicSampler, instance_health, process_cpu_s

SAMPLE_EVERY_S = 1.0          # the Sampler's period
HEALTH_TIMEOUT_S = 0.5        # a /health that takes longer is recorded as missing
TAIL_QUANTILE = 0.99          # "the slowest 1 %"
K6_POINTS = "k6-points.csv"
# What k6 must still tag with: the thresholds of rinha.js use these (name, expected_response).
K6_SYSTEM_TAGS = "name,status,expected_response"


def k6_trace_args(out_dir):
    """(extra k6 arguments, extra environment) that make k6 write its per-request points."""
    path = Path(out_dir) / K6_POINTS
    return (["--out", f"csv={path}", f"--system-tags={K6_SYSTEM_TAGS}"],
            {"K6_CSV_TIME_FORMAT": "unix_milli", "K6_CSV_SAVE_INTERVAL": "1s"})


# ---------------------------------------------------------------------------
# Sampling the stack
# ---------------------------------------------------------------------------

def cpu_s_or_none(pid):
    """utime + stime of one process (all its threads), in seconds; None if it is gone."""
    try:
        return process_cpu_s(pid)
    except OSError:
        return None


def cgroup_throttled(cpu_dir):
    """(nr_throttled, throttled seconds) of a cgroup v1 cpu directory, or None."""
    if not cpu_dir:
        return None
    try:
        stat = dict(line.split() for line in Path(cpu_dir, "cpu.stat").read_text().splitlines())
        return int(stat["nr_throttled"]), int(stat["throttled_time"]) / 1e9
    except (OSError, KeyError, ValueError):
        return None


def timed_health(socket_path):
    """(seconds /health took, its JSON) over an instance's unix socket; (None, None) if none."""
    started = time.monotonic()
    health = instance_health(socket_path, HEALTH_TIMEOUT_S)
    return (None, None) if health is None else (time.monotonic() - started, health)


class Sampler(PeriodicSampler):
    """Once a second, samples what targets() names until stop().

    targets() returns {"processes": {name: pid}, "instances": {name: unix socket path},
    "cgroup_cpu_dir": path or None}; it is called at each tick, so a restarted process is
    followed."""

    def __init__(self, targets, every_s=SAMPLE_EVERY_S):
        super().__init__(self.sample, every_s, name="trace-sampler")
        self.targets = targets

    def sample(self, elapsed_s=None):
        targets = self.targets()
        out = {"t": time.time(), "cpu_s": {}, "health": {}}
        for name, pid in targets.get("processes", {}).items():
            out["cpu_s"][name] = cpu_s_or_none(pid) if pid else None
        for name, socket_path in targets.get("instances", {}).items():
            took, health = timed_health(socket_path)
            health = health or {}
            gc = health.get("gc") if isinstance(health.get("gc"), dict) else {}
            out["health"][name] = {
                "health_ms": None if took is None else took * 1000,
                "loop_lag_ms": health.get("loop_lag_ms"),
                "queue": health.get("queue"),
                "in_flight": health.get("in_flight"),
                "gc_collections": gc.get("collections"),
                "gc_total_ms": gc.get("total_ms"),
            }
        out["throttled"] = cgroup_throttled(targets.get("cgroup_cpu_dir"))
        return out


def arena_targets(arena):
    """A targets() for Sampler that follows a bench/arena.py Arena."""
    def targets():
        children = arena.children
        processes = {name: children[name].pid for name in (LB_SERVICE,) + INSTANCES if name in children}
        cgroup = arena.cgroups.dirs.get("cpu") if arena.cgroups else None
        return {"processes": processes, "instances": {n: arena.socket_path(n) for n in INSTANCES},
                "cgroup_cpu_dir": cgroup}
    return targets


def _socket_inodes(table, match):
    """Inodes of the sockets in /proc/net/<table> whose line matches `match`."""
    inodes = set()
    try:
        lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
    except OSError:
        return inodes
    for line in lines:
        fields = line.split()
        if match(fields):
            inodes.add(fields[9] if table.startswith("tcp") else fields[6])
    return inodes


def _owners(inodes):
    """The lowest pid holding each socket inode (the master, for a pre-forked server)."""
    owners = {}
    wanted = {f"socket:[{inode}]": inode for inode in inodes}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{entry}/fd/{fd}")
            except OSError:
                continue
            if link in wanted:
                inode = wanted[link]
                owners[inode] = min(owners.get(inode, int(entry)), int(entry))
    return owners


def running_stack_targets(run_dir, lb_port):
    """A targets() for a stack started by `make run`: the instances' sockets are in run_dir
    (api1.sock, api2.sock); the processes are found by who holds those sockets and who listens
    on lb_port. Found once; the CPU columns of a process that restarts are lost after it does."""
    sockets = {name: str(Path(run_dir) / f"{name}.sock") for name in INSTANCES}
    processes = {}
    for name, path in sockets.items():
        inodes = _socket_inodes("unix", lambda f, p=path: len(f) >= 8 and f[7] == p)
        owners = _owners(inodes)
        processes[name] = min(owners.values()) if owners else None
    port_hex = f":{lb_port:04X}"
    listen = "0A"  # TCP_LISTEN
    inodes = set()
    for table in ("tcp", "tcp6"):
        inodes |= _socket_inodes(table, lambda f: len(f) > 9 and f[1].endswith(port_hex) and f[3] == listen)
    owners = _owners(inodes)
    processes[LB_SERVICE] = min(owners.values()) if owners else None
    found = {"processes": processes, "instances": sockets, "cgroup_cpu_dir": None}
    return lambda: found


# ---------------------------------------------------------------------------
# Digest
# ---------------------------------------------------------------------------

def quantile(sorted_values, q):
    """The q-quantile of sorted values, as k6 computes percentiles (linear interpolation)."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q
    low = math.floor(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def read_k6_points(path, start_ms):
    """{second since start: [durations in ms of POST /payments that ended in it]} and the
    number of non-2xx answers per second, from k6's CSV output."""
    durations, failed = {}, {}
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return durations, failed
        col = {name: i for i, name in enumerate(header)}
        metric, stamp, value, name = col["metric_name"], col["timestamp"], col["metric_value"], col["name"]
        status = col.get("status")
        for row in reader:
            if row[metric] != "http_req_duration" or row[name] != "payments":
                continue
            sec = int((int(row[stamp]) - start_ms) // 1000)
            durations.setdefault(sec, []).append(float(row[value]))
            if status is not None and not row[status].startswith("2"):
                failed[sec] = failed.get(sec, 0) + 1
    return durations, failed


def _per_second_cpu(samples, start_s, name):
    """{second: CPU used by process `name` in that second (fraction of one core)}."""
    out = {}
    for a, b in zip(samples, samples[1:]):
        ca, cb = a["cpu_s"].get(name), b["cpu_s"].get(name)
        if ca is None or cb is None or cb < ca or b["t"] <= a["t"]:
            continue
        out[int(math.floor((a["t"] + b["t"]) / 2 - start_s))] = (cb - ca) / (b["t"] - a["t"])
    return out


def _per_second_throttled(samples, start_s):
    out = {}
    for a, b in zip(samples, samples[1:]):
        if a.get("throttled") and b.get("throttled"):
            out[int(math.floor((a["t"] + b["t"]) / 2 - start_s))] = {
                "periods": b["throttled"][0] - a["throttled"][0],
                "ms": (b["throttled"][1] - a["throttled"][1]) * 1000}
    return out


def digest(points_path, samples, result):
    """One row per second of the test, and where the slowest 1 % of POST /payments fell."""
    start_ms = result["scenario_start_epoch_ms"]
    start_s = start_ms / 1000.0
    durations, failed = read_k6_points(points_path, start_ms) if Path(points_path).exists() else ({}, {})
    everything = sorted(d for values in durations.values() for d in values)
    cut = quantile(everything, TAIL_QUANTILE)
    tail_total = sum(1 for d in everything if d > cut) if everything else 0
    names = sorted({n for s in samples for n in s["cpu_s"]})
    instances = sorted({n for s in samples for n in s["health"]})
    cpu = {n: _per_second_cpu(samples, start_s, n) for n in names}
    throttled = _per_second_throttled(samples, start_s)
    health = {}
    previous_gc = {}
    for s in samples:
        sec = int(math.floor(s["t"] - SAMPLE_EVERY_S / 2 - start_s))  # the lag covers the last second
        for n, h in s["health"].items():
            h = dict(h)
            # GC time since the previous sample (rinha.py reports a running total)
            total, before = h.get("gc_total_ms"), previous_gc.get(n)
            h["gc_ms"] = total - before if total is not None and before is not None and total >= before else None
            if total is not None:
                previous_gc[n] = total
            health.setdefault(sec, {})[n] = h
    seconds = sorted(set(durations) | set(cpu.get(names[0], {}) if names else set()) | set(health))
    seconds = [k for k in seconds if k >= 0]
    rows = []
    for k in seconds:
        values = sorted(durations.get(k, []))
        rows.append({
            "sec": k,
            "requests": len(values),
            "failed": failed.get(k, 0),
            "p50_ms": quantile(values, 0.50),
            "p99_ms": quantile(values, 0.99),
            "max_ms": values[-1] if values else None,
            "in_tail": sum(1 for d in values if d > cut) if cut is not None else 0,
            "cpu": {n: cpu[n].get(k) for n in names},
            "throttled": throttled.get(k),
            "health": health.get(k, {}),
        })
    worst = sorted((r for r in rows if r["in_tail"]), key=lambda r: -r["in_tail"])[:10]
    return {
        "start_epoch_ms": start_ms,
        "requests": len(everything),
        "p99_ms": cut,
        "tail_requests": tail_total,
        "tail_seconds": [{"sec": r["sec"], "in_tail": r["in_tail"], "p99_ms": r["p99_ms"],
                          "max_ms": r["max_ms"]} for r in worst],
        "processes": names,
        "instances": instances,
        "has_loop_lag": any(h.get("loop_lag_ms") is not None for r in rows for h in r["health"].values()),
        "schedule": [p for p in result.get("schedule", []) if p["at_s"] < result.get("duration_s", math.inf)],
        "duration_s": result.get("duration_s"),
        "rows": rows,
    }


def tail_line(trace):
    """Where the slowest 1 % fell, in one line."""
    if not trace["requests"]:
        return "trace: no POST /payments points"
    worst = ", ".join(f"{t['sec']} s ({t['in_tail']})" for t in trace["tail_seconds"][:5])
    return (f"trace: p99 {trace['p99_ms']:.2f} ms over {trace['requests']} POSTs; the {trace['tail_requests']} "
            f"slower ones fell most in seconds {worst or '-'}")


# ---------------------------------------------------------------------------
# Picture
# ---------------------------------------------------------------------------

def _phase_spans(schedule, end_s):
    """[(start, stop, processor, kind)] with kind "failing" or "slow"."""
    spans = []
    ordered = sorted(schedule, key=lambda p: p["at_s"])
    for i, p in enumerate(ordered):
        stop = ordered[i + 1]["at_s"] if i + 1 < len(ordered) else end_s
        for processor in ("default", "fallback"):
            cfg = p.get(processor) or {}
            if cfg.get("failure"):
                spans.append((p["at_s"], stop, processor, "failing"))
            elif cfg.get("delay"):
                spans.append((p["at_s"], stop, processor, f"slow {cfg['delay']} ms"))
    return spans


def plot(trace, png_path, title=""):
    """Draw trace.json as a PNG: latency, CPU, event loop, with the phases shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter

    rows = trace["rows"]
    secs = [r["sec"] + 0.5 for r in rows]
    end_s = max([r["sec"] + 1 for r in rows] + [trace.get("duration_s") or 0])
    fig, axes = plt.subplots(3, 1, figsize=(13, 10), sharex=True,
                             gridspec_kw={"height_ratios": [3, 2, 2]})
    colours = {("default", "failing"): "#d62728", ("fallback", "failing"): "#ff7f0e"}
    for ax in axes:
        for start, stop, processor, kind in _phase_spans(trace["schedule"], end_s):
            if kind == "failing":
                ax.axvspan(start, stop, color=colours[(processor, kind)], alpha=0.12 if processor == "default" else 0.0,
                           hatch=None if processor == "default" else "//", ec=colours[(processor, kind)], lw=0)
            elif processor == "default":
                ax.axvspan(start, stop, color="#bcbd22", alpha=0.10, lw=0)
    # 1. latency
    ax = axes[0]
    for key, label, style in (("max_ms", "max", ":"), ("p99_ms", "p99", "-"), ("p50_ms", "p50", "--")):
        ax.plot(secs, [r[key] for r in rows], style, label=label, lw=1.4)
    if trace["p99_ms"] is not None:
        ax.axhline(trace["p99_ms"], color="k", lw=0.8, alpha=0.5, label=f"run p99 {trace['p99_ms']:.2f} ms")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_ylabel("POST /payments (ms)\nas k6 saw it")
    ax2 = ax.twinx()
    ax2.bar(secs, [r["in_tail"] for r in rows], width=0.8, color="grey", alpha=0.25)
    ax2.set_ylabel("requests over the run's p99")
    handles, labels = ax.get_legend_handles_labels()
    handles += [Patch(color="#d62728", alpha=0.25, label="default failing"),
                Patch(fc="none", ec="#ff7f0e", hatch="//", label="fallback failing"),
                Patch(color="#bcbd22", alpha=0.25, label="default slow")]
    ax.legend(handles=handles, loc="upper left", fontsize=8, ncol=4)
    # 2. CPU
    ax = axes[1]
    for name in trace["processes"]:
        ax.plot(secs, [None if r["cpu"].get(name) is None else r["cpu"][name] * 100 for r in rows], label=name, lw=1.2)
    ax.set_ylabel("CPU (% of a core)")
    if any((r["throttled"] or {}).get("ms") for r in rows):
        ax3 = ax.twinx()
        ax3.bar(secs, [(r["throttled"] or {}).get("ms", 0) for r in rows], width=0.8, color="red", alpha=0.3)
        ax3.set_ylabel("cgroup throttled (ms)")
    ax.legend(loc="upper left", fontsize=8)
    # 3. event loop
    ax = axes[2]
    key = "loop_lag_ms" if trace["has_loop_lag"] else "health_ms"
    label = "event-loop lag, max over the last second (ms)" if key == "loop_lag_ms" else "GET /health answer time (ms)"
    for name in trace["instances"]:
        ax.plot(secs, [r["health"].get(name, {}).get(key) for r in rows], label=f"{name} {key}", lw=1.2)
    for name in trace["instances"]:
        gc = [(x, r["health"].get(name, {}).get("gc_ms")) for x, r in zip(secs, rows)]
        gc = [(x, v) for x, v in gc if v]
        if gc:
            ax.scatter([x for x, _ in gc], [v for _, v in gc], marker="v", s=18, label=f"{name} GC ms in the second")
    ax.set_ylabel(label, fontsize=8)
    ax4 = ax.twinx()
    for name in trace["instances"]:
        ax4.plot(secs, [r["health"].get(name, {}).get("queue") for r in rows], ":", lw=1, label=f"{name} queue")
    ax4.set_ylabel("queued payments")
    lines = ax.get_legend_handles_labels()
    extra = ax4.get_legend_handles_labels()
    ax.legend(lines[0] + extra[0], lines[1] + extra[1], loc="upper left", fontsize=8)
    ax.set_xlabel("seconds since the test started")
    ax.set_xlim(0, end_s)
    fig.suptitle(title or "POST /payments latency and the stack, per second")
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)


def write_trace(out_dir, samples, result, title=""):
    """Digest, write trace.json and trace.png in out_dir, drop the raw k6 points; the trace."""
    out = Path(out_dir)
    points = out / K6_POINTS
    trace = digest(points, samples, result)
    trace["title"] = title
    (out / "trace.json").write_text(json.dumps(trace) + "\n")
    plot(trace, out / "trace.png", title)
    if points.exists():
        points.unlink()  # tens of MB; the digest keeps what the picture needs
    return trace


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench.tailtrace <dir holding trace.json>", file=sys.stderr)
        return 2
    out = Path(argv[0])
    trace = json.loads((out / "trace.json").read_text())
    plot(trace, out / "trace.png", trace.get("title") or re.sub(r"\s+", " ", str(out)))
    print(f"trace: wrote {out / 'trace.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
