"""A short seeded chaos run in `make test` (bench/chaos.py): the whole native stack under
connection resets, partial answers, stalls, 500/429, latency spikes, refused connections,
SIGKILL/SIGTERM/SIGSTOP of instances and emulators, then exact-once accounting at quiescence.

CHAOS_SEED=<n> replays another seed; `make chaos SEED=<n>` runs a longer one.
"""

import os

from bench import chaos

SEED = int(os.environ.get("CHAOS_SEED") or 20251202)
DURATION_S = 45.0
RATE = 100


def test_seeded_chaos_run_keeps_every_accepted_payment_exactly_once_and_the_summary_exact(tmp_path):
    lines = []
    verdict = chaos.run(SEED, DURATION_S, RATE, say=lines.append, log_path=tmp_path / "chaos.log",
                        quiescence_timeout_s=90.0)
    assert verdict.figures.get("accepted_ids", 0) > DURATION_S * RATE / 2, "\n".join(lines)
    assert verdict.ok, "\n".join(lines)


def _verdict(attempts, records, backend=None, processors=None):
    amounts = {"a": "1.00", "b": "2.50", "c": "3.10", "d": "4.00"}
    held = {p: {"totalRequests": len(r), "totalAmount": sum(r.values(), chaos.Decimal("0"))}
            for p, r in records.items()}
    verdict = chaos.Verdict(0)
    chaos.check(verdict, attempts, amounts, records, backend or held, processors or held)
    return verdict


def test_the_checks_flag_lost_doubled_refused_wrongly_stored_and_unequal_summaries():
    D = chaos.Decimal
    ok, unknown, refused = (0.1, "accepted", 202), (0.2, "unknown", "timeout"), (0.3, "refused", 503)
    good = {"default": {"a": D("1.00")}, "fallback": {"b": D("2.50")}}
    assert _verdict({"a": [ok], "b": [unknown, ok], "c": [unknown], "d": [refused]}, good).ok
    lost = _verdict({"a": [ok], "c": [ok]}, {"default": {"a": D("1.00")}, "fallback": {}})
    doubled = _verdict({"a": [ok]}, {"default": {"a": D("1.00")}, "fallback": {"a": D("1.00")}})
    stored_refused = _verdict({"d": [refused]}, {"default": {"d": D("4.00")}, "fallback": {}})
    wrong_amount = _verdict({"a": [ok]}, {"default": {"a": D("1.01")}, "fallback": {}})
    summary = _verdict({"a": [ok]}, {"default": {"a": D("1.00")}, "fallback": {}},
                       backend={"default": {"totalRequests": 1, "totalAmount": D("1.01")},
                                "fallback": {"totalRequests": 0, "totalAmount": D("0")}})
    stranger = _verdict({"a": [ok]}, {"default": {"a": D("1.00")}, "fallback": {}},
                        processors={"default": {"totalRequests": 2, "totalAmount": D("2.00")},
                                    "fallback": {"totalRequests": 0, "totalAmount": D("0")}})
    for name, verdict in [("lost", lost), ("doubled", doubled), ("stored_refused", stored_refused),
                          ("wrong_amount", wrong_amount), ("summary", summary), ("stranger", stranger)]:
        assert not verdict.ok, name


# ---------------------------------------------------------------------------
# Defects the chaos runs found, reproduced on their own
# ---------------------------------------------------------------------------

def _pinned_and_queued(arena):
    healths = [arena.health(name) for name in chaos.INSTANCES]
    assert all(healths), healths
    return sum(h["pinned"] for h in healths), sum(h["queue"] + h["in_flight"] for h in healths)


def test_a_pinned_payment_settled_as_another_requests_duplicate_is_unpinned(tmp_path):
    """Found by `make chaos SEED=5` (and 3): a correlationId sent twice; one copy's attempt
    got no answer (pinned), the other copy was stored first; the pinned copy's retry gets
    422, GET /payments/{id} shows another requestedAt, the payment is settled (X) but its
    pin stays: /health reports pinned > 0 for ever and the chaos run never quiesces."""
    # One failure opens the breaker for 2 s: the pinned copy's retry waits while the other
    # copy is stored (a working processor gets pinned payments re-sent at once).
    arena = chaos.Arena(lb_port=0, default_port=0, fallback_port=0, run_dir=tmp_path, limits=False,
                        output=False, env={"BREAKER_FAILURES": "1", "BREAKER_RETRY_S": "2"})
    with arena:
        runner = chaos.Chaos(arena, lambda line: None)
        cid = "8f0c2d1e-0000-4000-8000-000000000001"
        assert runner.admin("default", "PUT", "/admin/configurations/chaos", {"reset_before": 1})
        status, _ = chaos.http_request(arena.url, "POST", "/payments",
                                       {"correlationId": cid, "amount": 10.0})
        assert status == 202
        deadline = chaos.time.monotonic() + 10
        while _pinned_and_queued(arena)[0] != 1:       # the attempt was reset: pinned
            assert chaos.time.monotonic() < deadline, "the payment was never pinned"
            chaos.time.sleep(0.05)
        assert runner.admin("default", "PUT", "/admin/configurations/chaos", {})
        status, _ = chaos.http_request(arena.default_url, "POST", "/payments", {
            "correlationId": cid, "amount": 10.0, "requestedAt": "2020-01-01T00:00:00.000Z"})
        assert status == 200                            # the other copy got there first
        _wait_settled(arena, 15)                        # no pin left once it is settled


def _stored_in(arena, cid):
    return [name for name, url in (("default", arena.default_url), ("fallback", arena.fallback_url))
            if chaos.http_request(url, "GET", f"/payments/{cid}")[0] == 200]


def _wait_settled(arena, timeout_s):
    waited, healths = arena.wait_drained(timeout_s, chaos.QUIESCENT, poll_s=0.1)
    assert waited is not None, f"not settled: {healths}"


def test_an_id_sent_again_after_it_was_stored_is_not_stored_in_the_other_processor(tmp_path):
    """Found by `make chaos SEED=6` (96 ids stored in both processors, all sent twice by the
    client, seconds apart): each copy is accepted and routed on its own, so when the default
    fails long enough for the second copy to go to the fallback, the one payment is stored,
    and counted, in both. (FALLBACK_AFTER_S is shortened here to make it quick.)"""
    arena = chaos.Arena(lb_port=0, default_port=0, fallback_port=0, run_dir=tmp_path, limits=False,
                        output=False, env={"FALLBACK_AFTER_S": "0.5"})
    with arena:
        runner = chaos.Chaos(arena, lambda line: None)
        cid = "8f0c2d1e-0000-4000-8000-000000000002"
        payment = {"correlationId": cid, "amount": 10.0}
        assert chaos.http_request(arena.url, "POST", "/payments", payment)[0] == 202
        _wait_settled(arena, 10)
        assert _stored_in(arena, cid) == ["default"]
        chaos.time.sleep(1)  # seconds apart, as in the chaos run (ids reach the peer within 50 ms)
        assert runner.admin("default", "PUT", "/admin/configurations/failure", {"failure": True})
        assert chaos.http_request(arena.url, "POST", "/payments", payment)[0] in (200, 202)
        chaos.time.sleep(3)                                   # six hold times
        assert runner.admin("default", "PUT", "/admin/configurations/failure", {"failure": False})
        _wait_settled(arena, 15)
        assert _stored_in(arena, cid) == ["default"]


def test_two_copies_of_an_id_retried_together_on_one_instance_are_counted_once(tmp_path):
    """Found by `make chaos SEED=10` (backend 34824 payments on default, processor 34823; the
    extra one, 384.93, an id the client sent twice 0.3 s apart): copies of one id share its
    pin, so both retries carry the first attempt's requestedAt; one gets 200, the other 422,
    and GET /payments/{id} shows "our" requestedAt: both are counted. The backend then reports
    more than the processors hold (a negative lag, which disqualifies).

    Emulator draws with seed 8 and reset_after 0.5: the first attempt is stored and its answer
    lost, the next two are not faulted; every attempt waits spike_ms first, so the second copy
    arrives while the first copy's retry is in flight."""
    arena = chaos.Arena(lb_port=0, default_port=0, fallback_port=0, run_dir=tmp_path, limits=False,
                        output=False)
    with arena:
        runner = chaos.Chaos(arena, lambda line: None)
        api1 = f"unix:{arena.socket_path('api1')}"
        payment = {"correlationId": "8f0c2d1e-0000-4000-8000-000000000003", "amount": 10.0}
        assert runner.admin("default", "PUT", "/admin/configurations/chaos",
                            {"reset_after": 0.5, "spike": 1, "spike_ms": 1000, "seed": 8})
        assert chaos.http_request(api1, "POST", "/payments", payment)[0] == 202
        chaos.time.sleep(1.5)               # first attempt lost at ~1 s; its retry in flight
        assert chaos.http_request(api1, "POST", "/payments", payment)[0] == 202
        _wait_settled(arena, 15)
        assert runner.admin("default", "PUT", "/admin/configurations/chaos", {})
        token = {"X-Rinha-Token": arena.token}
        held = chaos.get_json(arena.default_url, "/admin/payments-summary", token)["totalRequests"]
        assert held == 1
        chaos.time.sleep(1.0)  # the other instance's replica follows within REPLICA_INTERVAL_S
        for instance in ("api1", "api2"):  # each answers for the whole backend: once, not twice
            counted = chaos.get_json(f"unix:{arena.socket_path(instance)}", "/payments-summary")
            assert counted["default"]["totalRequests"] == held, (instance, counted)
