"""A short contest scenario through the real stack (part of `make test`, about 25 s).

bench/arena.py starts the load balancer, two rinha.py instances (limited like the contest when
possible) and two processor emulators on free ports; bench/rinha.js runs through k6 for 20 s
ramping to 100 VUs with bench/phases/short.json: the default healthy, then slow (100 ms) for
6 s, then failing for 3 s, then healthy again; the fallback healthy throughout. The run must end
with nothing lost, nothing misreported and nothing sent to the fallback while the default was
merely slow (nor at all, while rinha.py holds payments for the default longer than the outage).
"""
import json
import re
import secrets
import shutil
import sys
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PHASES = BENCH / "phases" / "short.json"
DURATION_S = 20
MAX_REQUESTS = 100

if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))


def fallback_hold_s():
    """rinha.py's default FALLBACK_AFTER_S (how long the default must have been failing before
    the fallback may take payments), or None when rinha.py does not define one."""
    match = re.search(r'FALLBACK_AFTER_S\s*=\s*env_float\("FALLBACK_AFTER_S",\s*([0-9.]+)\)',
                      (REPO / "rinha.py").read_text())
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
    from arena import Arena
    from load import arena_targets, run_load

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
        }
        log_path = tmp / "k6.log"
        result = run_load(overrides, tmp / "out", log_path=log_path, dashboard=False, timeout_s=120)
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
