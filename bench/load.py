#!/usr/bin/env python3
"""Run the contest scenario (bench/rinha.js, k6) against a running stack: `make load`.

Start the stack first in another terminal (`make run`), then:

    python -m bench.load [--max-requests 550] [--duration 60] [--phases bench/phases/contest.json]
                         [--amounts fixed|random] [--trace] [--backend-url http://localhost:9999] [--default-admin-url http://localhost:8001]
                         [--fallback-admin-url http://localhost:8002] [--out-dir bench/out]

The same settings may come from the environment (MAX_REQUESTS, DURATION_S, PHASES, AMOUNTS,
BACKEND_URL, DEFAULT_ADMIN_URL, FALLBACK_ADMIN_URL, PROCESSOR_TOKEN, PURGE_TOKEN); options win.
AMOUNTS=fixed (the default) sends 19.90 as the contest does; AMOUNTS=random sends uniform random
whole cents from 0.01 to 10,000.00. Prints the result and the oracle (bench/oracle.py: the profit
a router knowing the schedule would have made with the same accepted payments, and the run's
share of it). --trace (or TRACE=1) also records the test second by second (bench/tailtrace.py:
POST /payments p50/p99/max as k6 saw it, each process's CPU, each instance's event-loop lag and
queue from GET /health over its unix socket in ARENA_RUN_DIR, default ./run) and draws
<out-dir>/trace.png. Writes <out-dir>/result.json (the score and its parts, the oracle), <out-dir>/k6-summary.json (k6's raw summary) and
<out-dir>/report.html (k6's web-dashboard report: one self-contained file, opens offline). Exits
non-zero when k6 cannot run the test or no result comes out of it.

run_load() is the reusable part (bench.py and test_scenario.py call it).
"""
import argparse
import json
import os
import sys
import urllib.parse
import urllib.request
from pathlib import Path

from bench import tailtrace
from bench.common import BENCH, OUT as DEFAULT_OUT, REPO, run_k6
from bench.oracle import oracle_for_result, oracle_line

SCRIPT = BENCH / "rinha.js"
# Settings rinha.js reads from its environment.
K6_SETTINGS = ("BACKEND_URL", "DEFAULT_ADMIN_URL", "FALLBACK_ADMIN_URL", "MAX_REQUESTS", "DURATION_S",
               "PHASES", "PROCESSOR_TOKEN", "PURGE_TOKEN", "AMOUNTS")


class LoadError(RuntimeError):
    """k6 could not run the scenario, or it produced no result."""


def _resolve(path):
    """A schedule path as given on the command line: relative to the cwd, else to the repo."""
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists():
        return str(candidate.resolve())
    return str((REPO / candidate).resolve())


def arena_targets(arena, purge_token):
    """The k6 variables that point the scenario at a running bench/arena.py stack."""
    return {
        "BACKEND_URL": arena.url,
        "DEFAULT_ADMIN_URL": arena.default_url,
        "FALLBACK_ADMIN_URL": arena.fallback_url,
        "PROCESSOR_TOKEN": arena.token,
        "PURGE_TOKEN": purge_token,
    }


def run_load(env_overrides=None, out_dir=None, *, log_path=None, dashboard=True, timeout_s=None,
             trace_targets=None, trace_title=""):
    """Run bench/rinha.js once and return the parsed result.json (plus "k6_exit_code", "out_dir").

    env_overrides: rinha.js settings (see K6_SETTINGS) and any other environment for k6; values are
    turned into strings. out_dir: where result.json, k6-summary.json and report.html go (default
    bench/out). log_path: when given, k6's output goes there instead of this process's stdout/stderr.
    trace_targets: when given (see bench/tailtrace.py Sampler), k6 also writes its per-request points
    and the stack is sampled each second; trace.json and trace.png go to out_dir and
    result["trace"] sums them up.
    Raises LoadError when k6 is missing, fails to run, or writes no result.
    """
    out = Path(out_dir or DEFAULT_OUT).resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = {key: value for key, value in (env_overrides or {}).items() if value is not None}
    phases = settings.get("PHASES", os.environ.get("PHASES"))
    if phases:
        settings["PHASES"] = _resolve(str(phases))
    settings["OUT_DIR"] = out
    if dashboard:
        settings["K6_WEB_DASHBOARD"] = "true"
        settings["K6_WEB_DASHBOARD_PORT"] = "-1"  # no live server: only the exported report
        settings["K6_WEB_DASHBOARD_EXPORT"] = out / "report.html"
    result_path = out / "result.json"
    for stale in (result_path, out / "report.html", out / "trace.json", out / "trace.png"):
        if stale.exists():
            stale.unlink()
    k6_args, sampler = (), None
    if trace_targets is not None:
        k6_args, k6_env = tailtrace.k6_trace_args(out)
        settings.update(k6_env)
        sampler = tailtrace.Sampler(trace_targets)
        sampler.start()
    try:
        # 99: a threshold failed; rinha.js's thresholds always pass
        exit_code = run_k6(SCRIPT, settings, log_path=log_path, args=k6_args, timeout_s=timeout_s, error=LoadError)
    finally:
        samples = sampler.stop() if sampler else None
    if not result_path.exists():
        raise LoadError(f"k6 wrote no {result_path}" + (f" (log: {log_path})" if log_path else ""))
    result = json.loads(result_path.read_text())
    result["oracle"] = oracle_for_result(result)
    if samples is not None and result.get("scenario_start_epoch_ms"):
        digest = tailtrace.write_trace(out, samples, result, trace_title)
        result["trace"] = {"json": str(out / "trace.json"), "png": str(out / "trace.png"),
                           "p99_ms": digest["p99_ms"], "tail_seconds": digest["tail_seconds"][:5],
                           "line": tailtrace.tail_line(digest)}
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    result["k6_exit_code"] = exit_code
    result["out_dir"] = str(out)
    return result


def backend_payments(backend_url):
    """How many payments the backend reports in all (None if it does not answer)."""
    try:
        with urllib.request.urlopen(f"{backend_url}/payments-summary", timeout=5) as response:
            summary = json.loads(response.read())
        return summary["default"]["totalRequests"] + summary["fallback"]["totalRequests"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def oracle_share(result):
    """The run's profit as a fraction of the oracle's (None when there is no oracle)."""
    return (result.get("oracle") or {}).get("share")


def summary_line(result):
    """One line for logs: the figures that matter."""
    share = oracle_share(result)
    return (f"score {result['score']:.2f}  p99 {result['p99']} ms  lag {result['lag']}  "
            f"oracle share {'-' if share is None else format(share * 100, '.1f') + ' %'}  "
            f"inconsistencies {result['inconsistencies']}  default {result['default']['totalRequests']}  "
            f"fallback {result['fallback']['totalRequests']}  failed POSTs {result['failed_posts']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-requests", type=int, help="VUs reached at the end of the ramp (550)")
    parser.add_argument("--duration", type=float, help="length of the ramp in seconds (60)")
    parser.add_argument("--phases", help="processor schedule (bench/phases/contest.json)")
    parser.add_argument("--amounts", choices=["fixed", "random"],
                        help="fixed: 19.90 (contest); random: uniform 0.01-10,000.00")
    parser.add_argument("--backend-url")
    parser.add_argument("--default-admin-url")
    parser.add_argument("--fallback-admin-url")
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT))
    parser.add_argument("--no-dashboard", action="store_true", help="skip the HTML report")
    parser.add_argument("--trace", action="store_true", default=os.environ.get("TRACE", "") not in ("", "0"),
                        help="record the test per second and draw trace.png ($TRACE=1)")
    args = parser.parse_args(argv)
    overrides = {
        "MAX_REQUESTS": args.max_requests, "DURATION_S": args.duration, "PHASES": args.phases,
        "AMOUNTS": args.amounts,
        "BACKEND_URL": args.backend_url, "DEFAULT_ADMIN_URL": args.default_admin_url,
        "FALLBACK_ADMIN_URL": args.fallback_admin_url,
    }
    backend_url = args.backend_url or os.environ.get("BACKEND_URL") or "http://localhost:9999"
    held = backend_payments(backend_url)
    if held is None:
        print(f"load: {backend_url}/payments-summary does not answer; start the stack first (`make run`)",
              file=sys.stderr)
        return 1
    if held and not os.environ.get("PURGE_TOKEN"):
        print(f"load: warning: the backend already holds {held} payments and PURGE_TOKEN is not set, so the "
              "test's purge will be refused; payments of a run that ended less than ~10 s ago would count "
              "against this one. Set the same PURGE_TOKEN for `make run` and `make load`.", file=sys.stderr)
    targets = None
    if args.trace:
        port = urllib.parse.urlsplit(backend_url).port or 80
        run_dir = os.environ.get("ARENA_RUN_DIR") or str(REPO / "run")
        targets = tailtrace.running_stack_targets(run_dir, port)
        found = targets()["processes"]
        print("load: trace: " + ", ".join(f"{name} pid {pid or 'not found'}" for name, pid in found.items()))
    try:
        result = run_load(overrides, args.out_dir, dashboard=not args.no_dashboard, trace_targets=targets,
                          trace_title=f"make load {Path(args.phases or os.environ.get('PHASES') or 'contest.json').name}")
    except LoadError as error:
        print(f"load: {error}", file=sys.stderr)
        return 1
    out = Path(result["out_dir"])
    print(f"load: {summary_line(result)}")
    print(f"load: {oracle_line(result)}")
    if result.get("trace"):
        print(f"load: {result['trace']['line']}")
        print(f"load: wrote {result['trace']['png']}")
    report = out / "report.html"
    print(f"load: wrote {out / 'result.json'}" + (f" and {report}" if report.exists() else ""))
    if not result.get("teardown_ok"):
        print("load: the teardown could not read the summaries (is the stack up?)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
