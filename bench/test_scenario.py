"""A short contest scenario through the real stack (part of `make test`, about 25 s), and the
benchmark tooling's own logic (the oracle, the trace, the capacity search).

bench/arena.py starts the load balancer, two rinha.py instances (limited like the contest when
possible) and two processor emulators on free ports; bench/rinha.js runs through k6 for 20 s
ramping to 100 VUs with bench/phases/short.json: the default healthy, then slow (100 ms) for
6 s, then failing for 3 s, then healthy again; the fallback healthy throughout. The run must end
with nothing lost, nothing misreported and nothing sent to the fallback while the default was
merely slow (nor at all, while rinha.py holds payments for the default longer than the outage).
The amounts are random (AMOUNTS=random), so the backend's totals are compared to the cent.
"""
import json
import re
import secrets
import shutil
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest

from bench.common import BENCH, REPO

PHASES = BENCH / "phases" / "short.json"
DURATION_S = 20
MAX_REQUESTS = 100


def fallback_hold_s():
    """rinha.py's default FALLBACK_AFTER_S (how long the default must have been failing before
    the fallback may take payments), or None when rinha.py does not define one."""
    match = re.search(r"fallback_after_s: float = ([0-9.]+)", (REPO / "rinha.py").read_text())
    return float(match.group(1)) if match else None


def iso(ms):
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def admin_summary(url, token, from_ms=None, to_ms=None):
    query = f"?from={iso(from_ms)}&to={iso(to_ms)}" if from_ms is not None else ""
    request = urllib.request.Request(f"{url}/admin/payments-summary{query}", headers={"X-Rinha-Token": token})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    if not (REPO / "rinha.py").exists():
        pytest.skip("rinha.py does not exist yet")
    if not (BENCH / "arena.py").exists():
        pytest.skip("bench/arena.py does not exist yet")
    from bench.arena import Arena
    from bench.load import arena_targets, run_load
    from bench.tailtrace import arena_targets as trace_targets

    tmp = tmp_path_factory.mktemp("scenario")
    run_dir = Path("/tmp") / f"rinha-scenario-{secrets.token_hex(4)}"  # short: unix socket paths
    purge_token = secrets.token_hex(8)
    lines = []
    arena = Arena(lb_port=0, default_port=0, fallback_port=0, run_dir=run_dir, limits=True,
                  env={"PURGE_TOKEN": purge_token}, output=lines.append)
    arena.start()
    try:
        overrides = {
            **arena_targets(arena, purge_token),
            "MAX_REQUESTS": MAX_REQUESTS,
            "DURATION_S": DURATION_S,
            "PHASES": PHASES,
            "AMOUNTS": "random",
        }
        log_path = tmp / "k6.log"
        result = run_load(overrides, tmp / "out", log_path=log_path, dashboard=False, timeout_s=120,
                          trace_targets=trace_targets(arena))
        # The whole run as the processors saw it (teardown restored the initial token).
        whole = {name: admin_summary(url, arena.token)
                 for name, url in (("default", arena.default_url), ("fallback", arena.fallback_url))}
        yield {"result": result, "arena": arena, "whole": whole, "k6_log": log_path, "arena_log": lines}
    finally:
        arena.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def explain(scenario):
    return (f"result: {json.dumps(scenario['result'], indent=1)}\nk6 log tail:\n"
            + "\n".join(Path(scenario["k6_log"]).read_text().splitlines()[-30:])
            + "\narena log tail:\n" + "\n".join(scenario["arena_log"][-30:]))


def test_scenario_runs_to_the_end(scenario):
    result = scenario["result"]
    assert result["teardown_ok"], explain(scenario)
    assert result["phase_errors"] == 0, explain(scenario)
    assert result["consistency_check_errors"] == 0, explain(scenario)
    assert result["successful_posts"] > 500, explain(scenario)


def test_nothing_lost_or_misreported(scenario):
    result = scenario["result"]
    assert result["failed_posts"] == 0, explain(scenario)
    assert result["inconsistencies"] == 0, explain(scenario)
    assert result["lag"] == 0, explain(scenario)
    # The backend's teardown summary matches what the processors stored.
    assert result["default"]["totalRequests"] == result["default"]["processorTotalRequests"], explain(scenario)
    assert result["fallback"]["totalRequests"] == result["fallback"]["processorTotalRequests"], explain(scenario)
    assert scenario["whole"]["default"]["totalRequests"] + scenario["whole"]["fallback"]["totalRequests"] \
        == result["successful_posts"], explain(scenario)


def test_random_amounts_are_reported_to_the_cent(scenario):
    result = scenario["result"]
    assert result["amounts"] == "random"
    assert result["accepted_cents"] != 1990 * result["successful_posts"], explain(scenario)
    assert sum(result["accepted_by_sec"]) == result["successful_posts"], explain(scenario)
    assert result["amount_mismatch_cents"] == {"default": 0, "fallback": 0}, explain(scenario)
    assert result["amount_lag_cents"] == 0, explain(scenario)


def test_oracle_equals_the_run_when_every_payment_reached_the_default(scenario):
    result = scenario["result"]
    assert result["lag"] == 0 and result["fallback"]["totalRequests"] == 0, explain(scenario)
    # Everything went through the default, which the schedule allowed: the oracle can do no better.
    assert result["oracle"]["routing"]["fallback"]["payments"] == 0, explain(scenario)
    assert result["oracle"]["profit"] == pytest.approx(result["net"], abs=0.02), explain(scenario)
    assert result["oracle"]["share"] == pytest.approx(1.0, abs=1e-6), explain(scenario)


def test_trace_covers_every_second_of_the_run(scenario):
    result = scenario["result"]
    trace = json.loads(Path(result["trace"]["json"]).read_text())
    assert Path(result["trace"]["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {row["sec"]: row for row in trace["rows"]}
    # Every POST k6 made is in exactly one second, and every second of the ramp has some.
    assert sum(row["requests"] for row in trace["rows"]) == result["successful_posts"] + result["failed_posts"]
    assert all(rows[k]["requests"] > 0 for k in range(DURATION_S)), explain(scenario)
    assert trace["processes"] == ["api1", "api2", "load-balancer"]
    assert trace["instances"] == ["api1", "api2"]
    # The sampler saw both instances answer /health and measured CPU in (nearly) every second.
    seconds = range(1, DURATION_S - 1)
    assert all(rows[k]["health"]["api1"]["health_ms"] is not None for k in seconds), explain(scenario)
    assert all(rows[k]["cpu"]["api2"] is not None for k in seconds), explain(scenario)
    assert sum(rows[k]["cpu"]["api1"] for k in seconds) > 0
    # The slowest 1 % are located in seconds of the run.
    assert trace["tail_requests"] == sum(row["in_tail"] for row in trace["rows"])
    assert 0 < trace["tail_requests"] <= 0.011 * trace["requests"] + 1


def test_no_fallback_while_default_merely_slow(scenario):
    result = scenario["result"]
    phases = json.loads(PHASES.read_text())
    epochs = result["phase_epochs_ms"]
    slow = [i for i, p in enumerate(phases) if p["default"]["delay"] > 0 and not p["default"]["failure"]]
    assert slow and all(epochs[i] for i in slow), explain(scenario)
    for i in slow:
        start = epochs[i]
        end = epochs[i + 1] if i + 1 < len(phases) and epochs[i + 1] else start + 1000 * (DURATION_S - phases[i]["at_s"])
        window = admin_summary(scenario["arena"].fallback_url, scenario["arena"].token, start, end)
        assert window["totalRequests"] == 0, f"fallback used while the default was only slow: {window}\n" \
            + explain(scenario)


def test_no_fallback_for_an_outage_shorter_than_the_hold(scenario):
    hold = fallback_hold_s()
    phases = json.loads(PHASES.read_text())
    failing = [p["at_s"] for p in phases if p["default"]["failure"]]
    if hold is None:
        pytest.skip("rinha.py has no FALLBACK_AFTER_S")
    outage = 0.0
    for i, p in enumerate(phases):
        if p["default"]["failure"]:
            end = phases[i + 1]["at_s"] if i + 1 < len(phases) else DURATION_S
            outage += end - p["at_s"]
    assert failing and outage < hold
    assert scenario["whole"]["fallback"]["totalRequests"] == 0, explain(scenario)
    assert scenario["result"]["default"]["totalRequests"] == scenario["result"]["successful_posts"], explain(scenario)


# ---------------------------------------------------------------------------
# The oracle (bench/oracle.py): the best profit from the payments a run accepted.
# ---------------------------------------------------------------------------

FEES = {"default": 0.05, "fallback": 0.15}


def phase(at_s, default=(0, False), fallback=(0, False)):
    return {"at_s": at_s, "default": {"delay": default[0], "failure": default[1]},
            "fallback": {"delay": fallback[0], "failure": fallback[1]}}


def test_oracle_sends_everything_to_a_healthy_default():
    from bench.oracle import oracle
    out = oracle([10, 20], [10_000, 30_000], [phase(0)], FEES, end_s=2.5)
    assert out["profit"] == pytest.approx(400.00 * 0.95)
    assert out["routing"]["default"]["payments"] == 30


def test_oracle_uses_the_fallback_once_the_default_never_comes_back():
    from bench.oracle import oracle
    schedule = [phase(0), phase(1, default=(0, True))]
    out = oracle([10, 10, 10], [1000, 2000, 3000], schedule, FEES, end_s=3.0)
    assert out["profit"] == pytest.approx(10.00 * 0.95 + 50.00 * 0.85)
    assert out["routing"]["fallback"]["payments"] == 20


def test_oracle_waits_for_the_default_when_it_recovers_before_the_end():
    from bench.oracle import oracle
    schedule = [phase(0), phase(1, default=(0, True)), phase(2)]
    out = oracle([10, 10, 10], [1000, 2000, 3000], schedule, FEES, end_s=3.0)
    assert out["profit"] == pytest.approx(60.00 * 0.95)
    assert out["routing"]["fallback"]["payments"] == 0


def test_oracle_earns_nothing_for_payments_no_processor_can_take_before_the_end():
    from bench.oracle import oracle
    schedule = [phase(0), phase(2, default=(0, True), fallback=(0, True))]
    out = oracle([10, 10, 10], [1000, 2000, 3000], schedule, FEES, end_s=3.0)
    assert out["profit"] == pytest.approx(30.00 * 0.95)
    assert out["routing"]["unroutable"] == {"payments": 10, "amount": 30.00}


def test_oracle_counts_a_slow_processor_800_in_flight_at_most():
    from bench.oracle import oracle
    # Default 1 s per payment: 800 per second of sending; a send must land before the end (4 s).
    schedule = [phase(0, default=(1000, False))]
    out = oracle([0, 0, 2000, 0], [0, 0, 200_000, 0], schedule, FEES, end_s=4.0)
    assert out["routing"]["default"]["payments"] == pytest.approx(800)
    assert out["routing"]["fallback"]["payments"] == pytest.approx(1200)


def test_oracle_knows_a_payment_fails_if_the_processor_fails_when_its_delay_ends():
    from bench.oracle import oracle
    # Default 1 s per payment and failing from 5 s: sends from 4 s on land in the failure.
    schedule = [phase(0, default=(1000, False)), phase(5, default=(1000, True))]
    out = oracle([0, 0, 0, 0, 10, 0, 0], [0, 0, 0, 0, 1000, 0, 0], schedule, FEES, end_s=7.0)
    assert out["routing"]["default"]["payments"] == 0
    assert out["routing"]["fallback"]["payments"] == 10


def test_oracle_counts_a_processor_as_usable_only_while_its_delay_keeps_the_promise():
    from bench.oracle import oracle
    # Default 1.5 s (the check's margin) from 1 s to 2 s: sends then would land inside windows
    # already checked; payments of second 1 wait for the default's return at 2 s instead.
    schedule = [phase(0), phase(1, default=(1500, False)), phase(2)]
    out = oracle([10, 10, 10], [1000, 2000, 3000], schedule, FEES, end_s=3.0)
    assert out["routing"]["default"]["payments"] == 30
    slow = oracle([10, 10], [1000, 2000], [phase(0, default=(2000, False))], FEES, end_s=5.0)
    assert slow["routing"]["default"]["payments"] == 0 and slow["routing"]["fallback"]["payments"] == 20


def test_oracle_gives_scarce_capacity_to_the_payments_with_fewest_options():
    from bench.oracle import oracle
    # Second 0: the default fails, the fallback takes anything. Second 1: the fallback fails and
    # the default (500 ms per payment) can store the sends of [1, 1.5) before the end at 2 s:
    # 800 of them. Second 1's payments have only the default: it must go to them, and second
    # 0's to the fallback.
    schedule = [phase(0, default=(0, True)), phase(1, default=(500, False), fallback=(0, True))]
    out = oracle([800, 800], [80_000, 80_000], schedule, FEES, end_s=2.0)
    assert out["routing"]["default"]["payments"] == pytest.approx(800)
    assert out["routing"]["fallback"]["payments"] == pytest.approx(800)
    assert out["routing"]["unroutable"]["payments"] == 0


def test_oracle_for_result_ignores_phases_the_test_never_reached():
    from bench.oracle import oracle_for_result
    result = {"teardown_ok": True, "net": 19.0, "duration_s": 2, "fee_rates": FEES,
              "accepted_by_sec": [1, 1, 0], "accepted_cents_by_sec": [1000, 1000, 0],
              "schedule": [phase(0), phase(2, default=(0, True))],  # not applied: at_s >= DURATION_S
              "scenario_start_epoch_ms": 1_000_000, "teardown_epoch_ms": 1_003_000}
    out = oracle_for_result(result)
    assert out["profit"] == pytest.approx(20.00 * 0.95)
    assert out["share"] == pytest.approx(1.0)
    assert oracle_for_result({**result, "teardown_ok": False}) is None


# ---------------------------------------------------------------------------
# The trace (bench/tailtrace.py): per-second latency and stack figures.
# ---------------------------------------------------------------------------

def test_trace_digest_puts_each_request_in_its_second_and_finds_the_slowest(tmp_path):
    from bench.tailtrace import digest, plot
    start_ms = 1_000_000_000
    points = tmp_path / "k6-points.csv"
    lines = ["metric_name,timestamp,metric_value,expected_response,name,status,extra_tags,metadata"]
    # Second 0: 99 requests of 1 ms; second 1: 99 of 2 ms and two of 50 ms (the tail); other
    # metrics and other request names are ignored; one 500 in second 1.
    lines += [f"http_req_duration,{start_ms + 10 + i},1.0,true,payments,202,," for i in range(99)]
    lines += [f"http_req_duration,{start_ms + 1000 + i},2.0,true,payments,202,," for i in range(99)]
    lines += [f"http_req_duration,{start_ms + 1500},50.0,true,payments,202,,",
              f"http_req_duration,{start_ms + 1600},50.0,false,payments,500,,",
              f"http_req_waiting,{start_ms + 1600},70.0,true,payments,202,,",
              f"http_req_duration,{start_ms + 1600},90.0,true,summary,200,,"]
    points.write_text("\n".join(lines) + "\n")
    t0 = start_ms / 1000
    samples = [{"t": t0 + k, "cpu_s": {"api1": 0.25 * k}, "throttled": None,
                "health": {"api1": {"health_ms": 1.0, "loop_lag_ms": 3.0 * k, "queue": k,
                                    "gc_total_ms": 0.5 * k * k}}} for k in range(4)]
    result = {"scenario_start_epoch_ms": start_ms, "duration_s": 2,
              "schedule": [{"at_s": 0, "default": {"delay": 0, "failure": False},
                            "fallback": {"delay": 0, "failure": True}}]}
    trace = digest(points, samples, result)
    rows = {row["sec"]: row for row in trace["rows"]}
    assert rows[0]["requests"] == 99 and rows[1]["requests"] == 101
    assert rows[1]["failed"] == 1
    assert rows[0]["p50_ms"] == 1.0 and rows[1]["max_ms"] == 50.0
    assert trace["requests"] == 200
    assert rows[1]["in_tail"] == trace["tail_requests"] == 2
    assert trace["tail_seconds"][0]["sec"] == 1
    # 0.25 CPU seconds per wall second: a quarter of a core, in the second the interval covers.
    assert rows[0]["cpu"]["api1"] == pytest.approx(0.25) and rows[2]["cpu"]["api1"] == pytest.approx(0.25)
    # The lag sampled at t covers the second before it.
    assert rows[1]["health"]["api1"]["loop_lag_ms"] == 6.0
    assert rows[1]["health"]["api1"]["gc_ms"] == pytest.approx(1.5)  # 2.0 - 0.5 ms of GC in that second
    assert trace["has_loop_lag"]
    plot(trace, tmp_path / "trace.png", "unit")
    assert (tmp_path / "trace.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------
# RESULTS.md tables and the capacity search (bench/results.py, bench/capacity.py).
# ---------------------------------------------------------------------------

def test_insert_row_goes_to_the_end_of_its_own_table(tmp_path):
    from bench.results import insert_row
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n\n## Other\n\n| x |\n| --- |\n| 9 |\n")
    insert_row("| 3 | 4 |", "| a | b |", path=path)
    insert_row("| 10 |", "| x |", path=path)
    insert_row("| new |", "| n |", section="## New\n\nlegend\n", path=path)
    insert_row("| newer |", "| n |", section="## New\n\nlegend\n", path=path)
    assert path.read_text() == ("# Results\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n| 3 | 4 |\n\n## Other\n\n"
                                "| x |\n| --- |\n| 9 |\n| 10 |\n\n## New\n\nlegend\n\n| n |\n| --- |\n"
                                "| new |\n| newer |\n")


def test_capacity_is_the_highest_step_with_every_step_below_it_sustained():
    from bench.capacity import sustained_rate

    def step(rate, p99, failed=0, done=1.0):
        return {"rate": rate, "requests": int(rate * 5 * done), "p99_ms": p99, "failed": failed}
    result = {"step_s": 5, "steps": [step(500, 2.0), step(1000, 3.0), step(1500, 9.9), step(2000, 10.5),
                                     step(2500, 4.0)]}
    assert sustained_rate(result)[0] == 1500  # 2000 misses the p99; 2500 does not count after it
    result["steps"][1] = step(1000, 3.0, failed=1)
    assert sustained_rate(result)[0] == 500
    result["steps"][1] = step(1000, 3.0, done=0.9)  # k6 could not offer the rate: not sustained
    assert sustained_rate(result)[0] == 500
    result["steps"][0] = step(500, None)
    assert sustained_rate(result) == (0, None)
