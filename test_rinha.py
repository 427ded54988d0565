"""Tests of rinha.py, in the order of its sections. Everything that can run here runs for
real: rinha.py on real sockets, against the processor emulator (bench/processor.py). Only
connection resets and 429s on demand come from a scripted fake. An instance runs in-process
(rinha.serve on its own event loop in a thread of the test process, see harness.py) unless the
test kills, hangs or signals it: then it is a process of its own (process=True)."""
import array
import asyncio
import decimal
import http.client
import json
import math
import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import rinha
from harness import (ROOT, InProcessInstance, assert_ledger_matches, call, drained, free_port, pay_many, raw,
                     send_payments, wait_until)

CONFIG = rinha.Config()  # the defaults; a test that needs another setting builds its own
MAX_CENTS = int(CONFIG.max_amount * 100)



# ---------------------------------------------------------------------------
# Harness: haproxy and the HTTP tests' instance (the rest is in harness.py, the fixtures that
# start and stop instances and processes in conftest.py)
# ---------------------------------------------------------------------------

class Balancer:
    """haproxy with the repository's haproxy.cfg on a free port, in front of the unix sockets
    api1.sock and api2.sock in socket_dir (installed with apt-get if missing, as make run does)."""

    def __init__(self, socket_dir):
        from bench import arena
        self.port = free_port()
        env = {**os.environ, "LB_HOST": "127.0.0.1", "LB_PORT": str(self.port), "SOCKET_DIR": str(socket_dir)}
        self.popen = subprocess.Popen([arena.ensure_lb_binary("haproxy"), "-db", "-f", str(ROOT / "haproxy.cfg")],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_until(lambda: self.answers(), timeout=10):
            self.stop()
            raise RuntimeError("haproxy not answering")

    def answers(self):
        try:
            return call(self.port, "GET", "/health", timeout=1)[0] == 200
        except (OSError, http.client.HTTPException):
            return False

    def stop(self):
        self.popen.terminate()
        self.popen.wait(10)


@pytest.fixture
def make_balancer():
    """make_balancer(socket_dir): a Balancer, stopped at teardown."""
    started = []

    def make(socket_dir):
        started.append(Balancer(socket_dir))
        return started[-1]
    yield make
    for balancer in started:
        balancer.stop()


@pytest.fixture(scope="module")
def front(processors, tmp_path_factory):
    """One instance for the HTTP-front tests, with short read and idle timeouts."""
    instance = InProcessInstance(tmp_path_factory.mktemp("front"), "front", *processors,
                                 READ_TIMEOUT_S=1, IDLE_TIMEOUT_S=3)
    yield instance
    instance.stop()


# ---------------------------------------------------------------------------
# Wire formats
# ---------------------------------------------------------------------------

def test_iso_ms_formats_like_javascript_toisostring():
    assert rinha.iso_ms(0) == b"1970-01-01T00:00:00.000Z"
    assert rinha.iso_ms(1752150896789) == b"2025-07-10T12:34:56.789Z"
    assert rinha.iso_ms(1752150897001) == b"2025-07-10T12:34:57.001Z"


@given(st.integers(min_value=0, max_value=4102444800000))
def test_iso_ms_round_trips_through_the_summary_parser(ms):
    text = rinha.iso_ms(ms).decode()
    assert rinha.parse_iso_ms(text, True) == ms == rinha.parse_iso_ms(text, False)


def test_parse_iso_ms_accepts_offsets_seconds_and_naive_utc():
    base = rinha.parse_iso_ms("2020-07-10T12:34:56.000Z", False)
    assert rinha.parse_iso_ms("2020-07-10T12:34:56Z", False) == base
    assert rinha.parse_iso_ms("2020-07-10T12:34:56", False) == base
    assert rinha.parse_iso_ms("2020-07-10T15:34:56+03:00", False) == base


def test_parse_iso_ms_rounds_sub_millisecond_bounds_inward():
    assert rinha.parse_iso_ms("1970-01-01T00:00:00.0015Z", True) == 2
    assert rinha.parse_iso_ms("1970-01-01T00:00:00.0015Z", False) == 1


@pytest.mark.parametrize("amount, cents", [(19.90, 1990), (19.9, 1990), (1, 100), (0.125, 12), (0.135, 14),
                                           (2.675, 268), (1.005, 100), (1e-3, 0), (123456.789, 12345679)])
def test_amount_to_cents_rounds_half_to_even_like_the_processor(amount, cents):
    assert rinha.amount_to_cents(amount) == cents


@given(st.floats(min_value=0, max_value=1e12, allow_nan=False))
def test_amount_to_cents_equals_decimal_rounding_of_the_number_as_written(amount):
    expected = int(Decimal(repr(amount)).quantize(Decimal("0.01"), ROUND_HALF_EVEN) * 100)
    assert rinha.amount_to_cents(amount) == expected


@pytest.mark.parametrize("value", [True, "19.90", None, [1], float("nan"), float("inf")])
def test_amount_to_cents_refuses_what_is_not_a_finite_number(value):
    assert rinha.amount_to_cents(value) is None


@pytest.mark.parametrize("amount, cents", [
    (1e27, 10**29), (1e308, 10**310), (-1e308, -10**310), (1.7976931348623157e308, 17976931348623157 * 10**294),
    (1e-9, 0), (5e-324, 0), (0.004, 0), (0.005, 0), (0.015, 2), (19.999, 2000), (-0.0, 0), (-19.999, -2000),
    (10**400, 10**402), (1000000000.01, 100000000001)])
def test_amount_to_cents_is_exact_at_any_magnitude_and_precision(amount, cents):
    assert rinha.amount_to_cents(amount) == cents


def exact_cents(value):
    """The reference: the number as written, times 100, rounded half to even, with room for 1e308."""
    with decimal.localcontext(decimal.Context(prec=1000)):
        return int((Decimal(repr(value)) * 100).to_integral_value(ROUND_HALF_EVEN))


@given(st.one_of(st.floats(), st.integers(min_value=-10**500, max_value=10**500)))
@example(1e27)
def test_amount_to_cents_never_raises_and_is_exact_for_any_number(value):
    cents = rinha.amount_to_cents(value)
    if isinstance(value, float) and not math.isfinite(value):
        assert cents is None
    else:
        assert cents == exact_cents(value)


# A JSON number as a client may write it: any sign, digits, fraction and exponent.
JSON_NUMBERS = st.from_regex(r"\A-?(0|[1-9][0-9]{0,40})(\.[0-9]{1,40})?([eE][-+]?[0-9]{1,4})?\Z")


@given(JSON_NUMBERS)
@example("1e27")
@example("1" + "0" * 400)
def test_amount_to_cents_never_raises_on_what_orjson_reads_from_any_json_number(text):
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:  # past the float range: parse_payment's "not valid JSON"
        return
    assert rinha.amount_to_cents(value) == exact_cents(value)


@given(st.integers(min_value=-10**15, max_value=10**15))
def test_cents_text_is_the_exact_two_decimal_json_number(cents):
    text = rinha.cents_text(cents)
    assert Decimal(text.decode()) * 100 == cents and text.split(b".")[1].__len__() == 2


# ---------------------------------------------------------------------------
# HTTP parsing (pure functions)
# ---------------------------------------------------------------------------

def test_parse_head_reads_method_path_query_length_and_token():
    request = rinha.parse_head(b"POST /purge-payments?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n"
                               b"X-Rinha-Token: abc", CONFIG.max_body_bytes)
    assert (request.method, request.path, request.query, request.length, request.token, request.keep_alive) == \
        (b"POST", b"/purge-payments", b"x=1", 12, b"abc", True)


@pytest.mark.parametrize("head, error", [
    (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked", rinha.MalformedRequest),
    (b"POST /payments HTTP/1.1\r\nTransfer-Encoding: chunked", rinha.TransferEncodingNotSupported),
    (b"POST /payments HTTP/1.1\r\nHost: a", rinha.LengthRequired),
    (b"POST /payments HTTP/1.1\r\nContent-Length: 99999999", rinha.BodyTooLarge),
    (b"POST /payments HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2", rinha.MalformedRequest),
    (b"POST /payments HTTP/1.1\r\nContent-Length: -1", rinha.MalformedRequest),
    (b"POST /payments HTTP/1.1\r\nContent-Length : 1", rinha.MalformedRequest),
    (b"POST /payments HTTP/1.1\r\n Content-Length: 1", rinha.MalformedRequest),
    (b"POST /payments HTTP/1.1\r\nX: a\nContent-Length: 1", rinha.MalformedRequest),
    (b"GET / HTTP/2.0", rinha.VersionNotSupported),
    (b"GET /", rinha.MalformedRequest),
    (b"GET http://x/ HTTP/1.1", rinha.MalformedRequest),
    (b"GET / HTTP/1.1\r\nno-colon", rinha.MalformedRequest),
])
def test_parse_head_names_each_framing_error(head, error):
    with pytest.raises(error):
        rinha.parse_head(head, CONFIG.max_body_bytes)


@given(st.binary(max_size=300))
def test_parse_head_raises_only_named_http_errors_on_random_bytes(data):
    try:
        rinha.parse_head(data, CONFIG.max_body_bytes)
    except rinha.HttpError:
        pass


@pytest.mark.parametrize("body, field", [
    (b"not json", None), (b"[1]", None),
    (b'{"amount": 1}', "correlationId"),
    (b'{"correlationId": "nope", "amount": 1}', "correlationId"),
    (b'{"correlationId": 5, "amount": 1}', "correlationId"),
    (b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3"}', "amount"),
    (b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": "1"}', "amount"),
    (b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": 0}', "amount"),
    (b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": -5}', "amount"),
    (b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": 0.001}', "amount"),
    (b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": 1e400}', None),  # orjson refuses numbers past float range
    (b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": true}', "amount"),
    (b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": 1000000000.01}', "amount"),
])
def test_parse_payment_names_the_invalid_field(body, field):
    with pytest.raises(rinha.InvalidRequest) as caught:
        rinha.parse_payment(body, MAX_CENTS)
    assert caught.value.field == field


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=8)


@given(st.one_of(JSON_NUMBERS, JSON_VALUES.map(json.dumps)))
@example("1e27")
@example("1e308")
@example("-0.0")
@example("19.999")
@example("1e-9")
@example("1" + "0" * 400)
def test_parse_payment_raises_only_invalid_payment_for_any_amount(amount):
    body = b'{"correlationId":"4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3","amount":%s}' % amount.encode()
    try:
        cid, cents = rinha.parse_payment(body, MAX_CENTS)
    except rinha.InvalidRequest:
        return
    assert cid == b"4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3" and 0 < cents <= MAX_CENTS


def test_parse_payment_ignores_unknown_fields_and_normalises_cents():
    body = b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": 19.905, "note": 1}'
    assert rinha.parse_payment(body, MAX_CENTS) == (b"4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", 1990)


def test_parse_window_is_open_without_bounds_and_400_on_garbage():
    assert rinha.parse_window(b"") == (-(1 << 62), 1 << 62)
    low, high = rinha.parse_window(b"from=2020-07-10T12:34:56.000Z&to=2020-07-10T12:35:56.000Z")
    assert high - low == 60_000
    assert rinha.parse_window(b"from=2020-07-10T15:34:56%2B03:00")[0] == low
    assert rinha.parse_window(b"from=2020-07-10T15:34:56+03:00")[0] == low
    with pytest.raises(rinha.InvalidRequest):
        rinha.parse_window(b"from=yesterday")


@given(st.one_of(st.binary(max_size=200),
                 st.builds(lambda a, b: b"from=" + a + b"&to=" + b, st.binary(max_size=40), st.binary(max_size=40)),
                 st.builds(lambda a: ("from=" + a).encode(), st.text(max_size=40))))
def test_parse_window_raises_only_invalid_query_on_random_queries(query):
    try:
        low, high = rinha.parse_window(query)
        assert isinstance(low, int) and isinstance(high, int)
    except rinha.InvalidRequest:
        pass


# ---------------------------------------------------------------------------
# HTTP over real sockets: keep-alive, pipelining, limits, timeouts
# ---------------------------------------------------------------------------

PAYMENT = b'{"correlationId":"%s","amount":19.90}'


def post(cid=None, extra=b""):
    body = PAYMENT % (cid or str(uuid.uuid4())).encode()
    return b"POST /payments HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n\r\n%s" % (extra, len(body), body)


def test_pipelined_requests_are_answered_in_order(front):
    data = post() + b"GET /nope HTTP/1.1\r\n\r\n" + post() + b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n"
    answer = raw(front.port, data)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"202", b"404", b"202", b"200"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30))
def test_requests_split_across_many_reads_are_reassembled(front, cuts):
    data = post() + post() + b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", front.port), timeout=3) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        at = 0
        for cut in cuts:
            sock.sendall(data[at:at + cut])
            at += cut
            time.sleep(0.001)  # lets the server read each piece on its own
        sock.sendall(data[at:])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.count(b"HTTP/1.1 202 Accepted") == 2 and answer.count(b"HTTP/1.1 200 OK") == 1


@pytest.mark.parametrize("data, status", [
    (b"GET /payments-summary HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", b"431"),
    (b"POST /payments HTTP/1.1\r\nContent-Length: 20000\r\n\r\n", b"413"),
    (b"POST /payments HTTP/1.1\r\nHost: a\r\n\r\n", b"411"),
    (b"POST /payments HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"501"),
    (b"POST /payments HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", b"400"),
    (b"GET / HTTP/3\r\n\r\n", b"505"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"400"),
])
def test_framing_errors_get_their_status_and_close_the_connection(front, data, status):
    answer = raw(front.port, data + post())  # the request after the error must not be read
    assert answer.startswith(b"HTTP/1.1 " + status)
    assert b"Connection: close" in answer and len(re.findall(rb"HTTP/1\.1 \d{3} ", answer)) == 1


def test_a_bad_payment_gets_400_naming_the_field_and_keeps_the_connection(front):
    bad = b'{"correlationId":"x","amount":1}'
    data = b"POST /payments HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(bad), bad) + post(extra=b"Connection: close\r\n")
    answer = raw(front.port, data)
    assert answer.startswith(b"HTTP/1.1 400") and b'"field":"correlationId"' in answer
    assert answer.count(b"HTTP/1.1 202") == 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=200), st.dictionaries(st.sampled_from(["correlationId", "amount", "x"]),
                                                        st.one_of(st.none(), st.booleans(), st.integers(-5, 0),
                                                                  st.floats(max_value=0), st.text(max_size=40)))))
def test_invalid_payments_get_400_and_change_nothing(front, payload):
    assert wait_until(lambda: drained(front))  # earlier tests' payments are all settled
    before = front.health()
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    status, _, answer = call(front.port, "POST", "/payments", body)
    assert status == 400 and b"error" in answer
    after = front.health()
    assert (after["accepted"], after["journal_bytes"]) == (before["accepted"], before["journal_bytes"])


def test_unknown_path_is_404_and_wrong_method_is_405_with_allow(front):
    assert call(front.port, "GET", "/nothing")[0] == 404
    status, headers, _ = call(front.port, "GET", "/payments")
    assert status == 405 and headers["Allow"] == "POST"
    status, headers, _ = call(front.port, "POST", "/payments-summary", b"")
    assert status == 405 and headers["Allow"] == "GET"


def test_http_1_0_and_connection_close_get_their_answer_then_a_close(front):
    for request in (b"GET /health HTTP/1.0\r\n\r\n", b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n"):
        answer = raw(front.port, request + b"GET /health HTTP/1.1\r\n\r\n", wait=2)
        assert answer.count(b"HTTP/1.1 200") == 1 and b"Connection: close" in answer


def test_a_request_not_finished_within_the_read_timeout_gets_408(front):
    with socket.create_connection(("127.0.0.1", front.port), timeout=5) as sock:  # the wait's timeout
        started = time.monotonic()
        sock.sendall(b"POST /payments HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")
        answer = b""
        while chunk := sock.recv(65536):  # the answer, then the server's close
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started >= 1  # READ_TIMEOUT_S


def test_idle_keep_alive_connections_are_closed_after_the_idle_timeout(front):
    with socket.create_connection(("127.0.0.1", front.port), timeout=8) as sock:  # the wait's timeout
        sock.sendall(b"GET /health HTTP/1.1\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert sock.recv(65536) == b""  # closed by the server
        assert time.monotonic() - started > 2  # IDLE_TIMEOUT_S is 3


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=2000))
def test_random_bytes_never_stall_or_kill_the_server(front, data):
    raw(front.port, data + b"\r\n\r\n", wait=0.2)
    assert call(front.port, "GET", "/health", timeout=3)[0] == 200


def test_hundreds_of_idle_and_slow_clients_do_not_delay_a_normal_client(processors, make_instance):
    # The order proves it: the normal client's payments are all answered while every slow
    # client is still sending its request, which READ_TIMEOUT_S then ends with a 408.
    instance = make_instance("crowded", *processors, READ_TIMEOUT_S=3)
    idle = [socket.create_connection(("127.0.0.1", instance.port)) for _ in range(300)]
    slow = [socket.create_connection(("127.0.0.1", instance.port)) for _ in range(100)]
    try:
        for sock in slow:
            sock.sendall(b"POST /payments HTTP/1.1\r\n")
        for _ in range(40):
            for sock in slow:
                sock.sendall(b"X")  # a header trickling in byte by byte
            assert instance.pay()[0] == 202
        for sock in slow:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):  # nothing for it yet: its request is unfinished
                sock.recv(65536)
        for sock in slow:
            sock.settimeout(5)  # the wait's timeout
            assert sock.recv(65536).startswith(b"HTTP/1.1 408")
    finally:
        for sock in idle + slow:
            sock.close()


def statuses(answer):
    return re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)


def test_a_bad_amount_between_two_good_payments_is_400_and_both_are_accepted(front, processors):
    good = [str(uuid.uuid4()), str(uuid.uuid4())]
    bad = [b"1e27", b"1e308", b"-1e308", b"1e-9", b"0.004", b"-0.0", b"1" + b"0" * 400, b"1e400", b"1000000000.01"]
    data = post(good[0])
    for amount in bad:
        body = b'{"correlationId":"%s","amount":%s}' % (str(uuid.uuid4()).encode(), amount)
        data += b"POST /payments HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    answer = raw(front.port, data + post(good[1], b"Connection: close\r\n"), wait=3)
    assert statuses(answer) == [b"202"] + [b"400"] * len(bad) + [b"202"]
    assert wait_until(lambda: all(any(p.stored(cid) for p in processors) for cid in good))
    assert "Fatal error" not in front.output()


def test_an_exact_amount_with_more_decimals_is_accepted_rounded_half_to_even(front, processors):
    cid = str(uuid.uuid4())
    assert call(front.port, "POST", "/payments", b'{"correlationId":"%s","amount":19.999}' % cid.encode())[0] == 202
    assert wait_until(lambda: any(p.stored(cid) for p in processors))
    stored = [call(p.port, "GET", f"/payments/{cid}") for p in processors]
    assert [json.loads(body)["amount"] for status, _, body in stored if status == 200] == [20.0]


@pytest.fixture(scope="module")
def balanced(processors, tmp_path_factory):
    """An instance listening on a port and on both of haproxy.cfg's unix sockets, behind haproxy."""
    tmp = tmp_path_factory.mktemp("lb")
    port = free_port()
    instance = InProcessInstance(tmp, "balanced", *processors, port=port,
                                 LISTEN=f"127.0.0.1:{port},unix:{tmp}/api1.sock,unix:{tmp}/api2.sock")
    try:
        balancer = Balancer(tmp)
    except BaseException:
        instance.stop()
        raise
    yield instance, balancer
    balancer.stop()
    instance.stop()


@pytest.mark.parametrize("via", ["direct", "haproxy"])
def test_a_2_mb_body_gets_a_413_the_client_reads_directly_and_through_haproxy(balanced, via):
    instance, balancer = balanced
    port = instance.port if via == "direct" else balancer.port
    for _ in range(20):  # before the lingering close, most were reset before the 413 was read
        assert call(port, "POST", "/payments", b"x" * 2_000_000)[0] == 413
    assert call(port, "GET", "/health")[0] == 200


@pytest.mark.parametrize("limit", ["bytes", "time"])
def test_a_lingering_close_is_bounded_in_bytes_and_in_time(processors, make_instance, limit):
    env = {"LINGER_BYTES": 100_000, "LINGER_S": 60} if limit == "bytes" else {"LINGER_BYTES": 10**9, "LINGER_S": 1}
    instance = make_instance("linger", *processors, **env)
    with socket.create_connection(("127.0.0.1", instance.port), timeout=10) as sock:
        sock.sendall(b"POST /payments HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):  # the 413, then our end of the stream
            answer += chunk
        assert statuses(answer) == [b"413"]
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            # Further bytes are read and dropped until the limit, then the connection is reset.
            for _ in range(100):
                sock.sendall(b"x" * 10_000 if limit == "bytes" else b"x")
                # A byte every 0.1 s lets time pass: 10 s in all, far past LINGER_S.
                time.sleep(0 if limit == "bytes" else 0.1)


def inject_faults(monkeypatch, name):
    """Faults injected into the head parser, a sync handler and an async one, as any bug there
    would be; only in the instance `name` (its thread's rinha.LOG.name), undone at teardown."""
    parse_head, parse_payment, totals = rinha.parse_head, rinha.parse_payment, rinha.Server.totals

    def here():
        return getattr(rinha.LOG, "name", None) == name

    def faulty_parse_head(head, limit):
        if here() and head.startswith(b"GET /boom"):
            raise RuntimeError("injected fault")
        return parse_head(head, limit)

    def faulty_parse_payment(body, limit):
        if here() and b"boom" in body:
            raise RuntimeError("injected fault")
        return parse_payment(body, limit)

    def faulty_totals(server, low, high, fresh):
        if here() and low == 0:
            raise RuntimeError("injected fault")
        return totals(server, low, high, fresh)
    monkeypatch.setattr(rinha, "parse_head", faulty_parse_head)
    monkeypatch.setattr(rinha, "parse_payment", faulty_parse_payment)
    monkeypatch.setattr(rinha.Server, "totals", faulty_totals)


# monkeypatch first: its teardown (undoing the faults) comes after make_instance's (the stop).
def test_an_unexpected_error_is_a_500_logged_once_and_closes_only_its_connection(monkeypatch, processors,
                                                                                 make_instance):
    inject_faults(monkeypatch, "faulty")
    instance = make_instance("faulty", *processors)
    with socket.create_connection(("127.0.0.1", instance.port), timeout=5) as bystander:
        bystander.sendall(b"GET /health HTTP/1.1\r\n\r\n")
        assert bystander.recv(65536).startswith(b"HTTP/1.1 200")
        boom = b'{"boom": 1}'
        data = post() + b"POST /payments HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(boom), boom) + post()
        answer = raw(instance.port, data, wait=3)
        assert statuses(answer) == [b"202", b"500"] and b"Connection: close" in answer
        for head in (b"GET /payments-summary?from=1970-01-01T00:00:00Z HTTP/1.1", b"GET /boom HTTP/1.1"):
            answer = raw(instance.port, post() + head + b"\r\n\r\n" + post(), wait=3)
            assert statuses(answer) == [b"202", b"500"]
        bystander.sendall(b"GET /health HTTP/1.1\r\n\r\n")  # the other connection still works
        assert bystander.recv(65536).startswith(b"HTTP/1.1 200")
    log = instance.output()
    errors = [line for line in log.splitlines() if "internal error" in line]
    assert len(errors) == 3 and "Fatal error" not in log, log
    assert "POST /payments HTTP/1.1" in errors[0] and "injected fault" in errors[0]
    assert "GET /payments-summary?from=1970-01-01T00:00:00Z HTTP/1.1" in errors[1]
    assert "GET /boom HTTP/1.1" in errors[2]


def test_connections_beyond_the_maximum_get_503_and_close(processors, make_instance):
    instance = make_instance("capped", *processors, MAX_CONNECTIONS=10)
    held = [socket.create_connection(("127.0.0.1", instance.port)) for _ in range(10)]
    try:  # once the server has taken the ten
        assert wait_until(lambda: raw(instance.port, b"GET /health HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 503"))
    finally:
        for sock in held:
            sock.close()
    assert wait_until(lambda: call(instance.port, "GET", "/health")[0] == 200)  # once it has seen them close



# ---------------------------------------------------------------------------
# Ledger and journal
# ---------------------------------------------------------------------------

def ledger_at(directory, name="ledger"):
    return rinha.Ledger(str(directory / name))


def brute_force(payments, processor, low, high):
    chosen = [cents for p, ms, cents in payments if p == processor and low <= ms <= high]
    return len(chosen), sum(chosen)


# Steps: ("pay", processor, ms, cents), ("freeze", safe default, safe fallback), ("flush",),
# ("restart",): a ledger whose recent part is in memory, the rest in its files, reopened at any
# moment (a crash: what was not flushed is lost, as the journal then mends).
STEPS = st.lists(st.one_of(
    st.tuples(st.just("pay"), st.sampled_from([0, 1]), st.integers(0, 10_000), st.integers(1, 10**6)),
    st.tuples(st.just("freeze"), st.integers(0, 10_000), st.integers(0, 10_000)),
    st.tuples(st.just("flush")), st.tuples(st.just("restart"))), max_size=120)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(STEPS, st.integers(-10, 10_010), st.integers(-10, 10_010))
def test_ledger_window_equals_a_brute_force_sum_whatever_was_frozen_or_reopened(tmp_path_factory, steps, low, high):
    directory = tmp_path_factory.mktemp("ledger")
    ledger, payments, written = ledger_at(directory), [], 0
    for step in steps:
        if step[0] == "pay":
            payments.append(step[1:])
            ledger.record(*step[1:])
        elif step[0] == "freeze":  # a safe bound is honoured: no later payment comes below it
            ledger.safe = list(step[1:])  # a payment may still come below it (a clock gone back): exact too
            ledger.freeze()
            written = ledger.count()
        elif step[0] == "flush":
            ledger.flush()
            written = ledger.count()
        else:
            ledger.close()
            ledger = ledger_at(directory)
            del payments[written:]  # not flushed: lost with the process (the journal mends it)
            assert ledger.count() == len(payments)
        for processor in (0, 1):
            assert ledger.window(processor, low, high) == brute_force(payments, processor, low, high)
    assert ledger.read(0, ledger.count()) == b"".join(rinha.LOG_ENTRY.pack(*payment) for payment in payments)
    ledger.close()


def test_ledger_memory_holds_only_the_unfrozen_tail_in_flat_arrays(tmp_path):
    ledger = ledger_at(tmp_path)
    for second in range(20):
        for i in range(500):
            ledger.record(i % 2, second * 1000 + i, 1990)
        ledger.safe = [second * 1000 + 1000] * 2  # everything so far is safe
        ledger.freeze()
        assert sum(len(times) for times, _ in ledger.tail) == 0
    assert all(type(column) is array.array for pair in ledger.tail for column in pair)
    assert ledger.count() == 10_000 and ledger.window(0, 0, 10**9) == (5000, 5000 * 1990)
    ledger.close()


def test_ledger_start_up_reads_only_what_came_after_its_checkpoint(tmp_path):
    ledger = ledger_at(tmp_path)
    for i in range(1000):
        ledger.record(0, i, 100)
    ledger.safe = [900, 0]
    ledger.freeze()  # 900 frozen, 100 in the tail, all in the checkpoint
    ledger.record(1, 2000, 7)  # after it: in the log only
    ledger.flush()
    ledger.close()
    log = tmp_path / "ledger.log"
    data = bytearray(log.read_bytes())
    data[:24 * 900] = rinha.LOG_ENTRY.pack(1, 5, 10**9) * 900  # history a start-up must not read
    log.write_bytes(bytes(data))
    again = ledger_at(tmp_path)
    assert again.window(0, 0, 10**6) == (1000, 100_000) and again.window(1, 0, 10**6) == (1, 7)
    assert sum(len(times) for times, _ in again.tail) == 101
    again.close()


def test_a_payment_confirmed_below_the_frozen_history_stays_exact(tmp_path):
    ledger = ledger_at(tmp_path)
    ledger.record(0, 100, 1)
    ledger.safe = [200, 200]
    ledger.freeze()
    ledger.record(0, 50, 2)  # the wall clock went back: below what is frozen
    ledger.safe = [300, 300]
    ledger.freeze()
    assert ledger.window(0, 0, 1000) == (2, 3) and ledger.window(0, 0, 60) == (1, 2)
    ledger.close()
    again = ledger_at(tmp_path)
    assert again.window(0, 0, 1000) == (2, 3) and again.window(0, 60, 1000) == (1, 1)
    again.close()


def packed(payments):
    return b"".join(rinha.LOG_ENTRY.pack(*payment) for payment in payments)


def test_retention_frees_old_history_keeps_newer_windows_exact_and_survives_a_restart(tmp_path):
    ledger = ledger_at(tmp_path)
    payments = [(i % 2, i, 100 + i % 7) for i in range(100_000)]  # requestedAt 0..99,999 ms
    ledger.extend(packed(payments))
    ledger.safe = [100_000, 100_000]
    ledger.freeze()
    files = [tmp_path / f"ledger.{suffix}" for suffix in ("log", "0", "1")]
    blocks = [os.stat(file).st_blocks for file in files]
    ledger.freeze(drop_before=60_000)
    assert ledger.kept_from == 60_000 and ledger.base == 60_000
    assert all(os.stat(file).st_blocks < before * 0.5 for file, before in zip(files, blocks))
    for reopen in (False, True):
        if reopen:
            ledger.close()
            ledger = ledger_at(tmp_path)
            assert ledger.kept_from == 60_000 and ledger.base == 60_000
        for low, high in ((60_000, 99_999), (70_123, 80_456), (99_999, 10**9), (60_000, 60_000)):
            for processor in (0, 1):
                assert ledger.window(processor, low, high) == brute_force(payments, processor, low, high)
        assert ledger.read(60_000, 60_003) == packed(payments[60_000:60_003])
    ledger.close()


def test_a_replica_whose_origin_dropped_old_history_takes_the_rest_and_a_summary_before_it_is_refused(tmp_path):
    config = rinha.Config(journal_path=str(tmp_path / "r.journal"), history_retention_s=60)
    own = rinha.Ledger(config.journal_path + ".ledger")
    pipeline = rinha.Pipeline(config, rinha.Journal(config.journal_path, config), own)
    server = rinha.Server(config, pipeline, [])
    entries = [(0, 1000 + i, 5) for i in range(10)]
    answer = server.replication.receive(replica_batch(b"peer", 0, 6, 10, entries[6:], base=6, kept_from=1006))
    assert answer.split()[1:] == [b"0", b"10"]  # it holds the origin's log up to 10, from 6 on
    replica = server.replication.replicas[b"peer"]
    assert replica.kept_from == 1006 and replica.window(0, 1006, 2000) == (4, 20)
    assert asyncio.run(server.summary(1006, 2000)) == rinha.SUMMARY_BODY % (4, b"0.20", 0, b"0.00")
    with pytest.raises(rinha.HistoryDropped) as refused:
        asyncio.run(server.summary(1005, 2000))
    assert refused.value.status == b"410 Gone" and "HISTORY_RETENTION_S" in refused.value.message
    own.close()
    replica.close()


def test_every_journal_record_kind_round_trips_through_the_one_table():
    samples = {b"A": (3, b"4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", 1990, 5), b"S": (3, 1, 7),
               b"C": (3, 1, 7, 1990, 12), b"X": (3,), b"U": (3,), b"P": (77,),
               b"I": (b"4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3",)}
    assert set(samples) == set(rinha.RECORDS)
    for kind, fields in samples.items():
        line = rinha.record(kind, *fields)
        assert line.endswith(b"\n") and rinha.read_record(line[:-1]) == (kind, fields)
    for bad in (b"", b"Q 1", b"P", b"A 1 x 2", b"C 1 2 3 4", b"X one", b"S 1 2 3 4", b"L 0 1 2"):
        with pytest.raises(ValueError):
            rinha.read_record(bad)


def test_journal_replay_rebuilds_pending_pins_mends_the_ledger_and_honours_purge(tmp_path):
    path = tmp_path / "j"
    path.write_bytes(b"A 9 old 5 0\nS 9 0 5\nC 9 0 5 5 0\nP 7\n"  # confirmed before the purge: gone
                     b"A 0 aaa 1990 1\nS 0 0 10\nC 0 0 10 1990 0\n"
                     b"A 1 bbb 500 2\nS 1 1 20\n"
                     b"A 2 ccc 700 3\nS 2 0 30\nU 2\n"
                     b"A 3 ddd 1 4\nX 3\n"
                     b"A 4 bbb 900 5\n"  # the same correlationId again: its own payment
                     b"garbage line\nC\n"
                     b"A 5 eee 100 6\nS 5 0 4")  # torn by a crash: the record is ignored, not the A
    ledger = ledger_at(tmp_path)  # empty: the C record of seq 0 is mended into it
    journal = rinha.Journal(str(path), CONFIG)
    pending, next_seq = journal.replay(ledger, rinha.RecentIds(CONFIG.remembered_ids))
    assert ledger.window(0, 0, 10**6) == (1, 1990) and ledger.count() == 1
    assert pending == {1: [b"bbb", 500, 2, (1, 20)], 2: [b"ccc", 700, 3, None], 4: [b"bbb", 900, 5, None],
                       5: [b"eee", 100, 6, None]}
    assert next_seq == 10 and ledger.epoch == 7  # seq 9 came before the purge: never given again
    journal.open_compacted(ledger, pending)
    ledger.close()
    again = ledger_at(tmp_path)  # the compaction dropped the C record: the ledger's files keep it
    assert rinha.Journal(str(path), CONFIG).replay(again, rinha.RecentIds(CONFIG.remembered_ids)) == (pending, 6)
    assert again.window(0, 0, 10**6) == (1, 1990) and again.count() == 1 and again.epoch == 7
    again.close()


def test_replay_adds_to_the_ledger_only_the_confirmations_its_log_lacks(tmp_path):
    ledger = ledger_at(tmp_path)
    ledger.record(0, 10, 100)  # index 0: written to the ledger before the crash
    ledger.flush()
    path = tmp_path / "j"
    path.write_bytes(b"A 0 aaa 100 1\nS 0 0 10\nC 0 0 10 100 0\n"
                     b"A 1 bbb 200 2\nS 1 1 20\nC 1 1 20 200 1\n")  # index 1: lost with the process
    rinha.Journal(str(path), CONFIG).replay(ledger, rinha.RecentIds(CONFIG.remembered_ids))
    assert ledger.count() == 2 and ledger.window(0, 0, 100) == (1, 100) and ledger.window(1, 0, 100) == (1, 200)
    ledger.close()


def test_a_short_journal_write_is_cut_back_so_the_next_record_survives(tmp_path):
    # Issue 9: a short write (disk full) left a fragment, the next record was glued to it and
    # lost at replay. Here the file-size limit makes the second append land short.
    import resource
    path = tmp_path / "j"
    journal = rinha.Journal(str(path), CONFIG)
    journal.open_compacted(ledger_at(tmp_path), {})
    first, second, third = b"X 1\n", b"X 2" + b" " * 100 + b"\n", b"X 3\n"
    journal.append(first)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(first) + 20, hard))
    try:
        with pytest.raises(OSError):
            journal.append(second)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    journal.append(third)
    assert path.read_bytes() == first + third


def test_the_journal_is_compacted_while_running_and_a_kill_during_it_loses_and_doubles_nothing(
        fresh, make_instance):
    # Issue 9: the journal grew by ~120 bytes a payment and was compacted only at start.
    default, fallback = fresh
    default.configure(delay=20)
    instance = make_instance("api1", default, fallback, process=True,  # killed
                             JOURNAL_COMPACT_BYTES=20000, JOURNAL_COMPACT_SLICE=50)
    outcome = []
    sender = threading.Thread(target=lambda: outcome.extend(send_payments(instance, 6000, threads=2)))
    sender.start()
    assert wait_until(lambda: "compacted while running" in instance.output(), timeout=30)
    instance.stop(signal.SIGKILL)  # payments still arriving, maybe another compaction under way
    sender.join()
    accepted, failed = outcome  # what the kill cut short failed on the connection, the rest got a 202
    assert failed and len(accepted) + len(failed) == 6000
    assert all(isinstance(error, str) for error in failed), set(failed)
    instance.start()
    default.configure(delay=0)
    assert wait_until(lambda: drained(instance), timeout=15)
    assert all(default.stored(cid) for cid in accepted)
    mine = assert_ledger_matches(instance, default, fallback)
    # Accepted: every 202, and at most one payment per sending thread that the kill caught
    # between its journal record and its answer (journaled, so forwarded; its client saw no 202).
    assert len(accepted) <= mine["default"]["totalRequests"] <= len(accepted) + 2 and accepted
    assert len(pay_many(instance, 4000)) == 4000  # ~120 bytes of records each
    assert wait_until(lambda: drained(instance))
    assert wait_until(lambda: "compacted while running" in instance.output())
    assert_ledger_matches(instance, default, fallback)
    before, after = map(int, re.findall(r"compacted while running: (\d+) -> (\d+) bytes",
                                        instance.output())[-1])
    assert after < before  # it also keeps what was under way and what came meanwhile: no bound
    instance.stop()
    instance.start()  # the same Journal.compaction, nothing under way: ~63 bytes an id remembered
    after = int(re.search(r"compacted at start: \d+ -> (\d+) bytes", instance.output())[1])
    assert after < 70 * (len(accepted) + 4000)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs of our own, and a way to fill it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(directory):
    """Write a filler file until the disk is full; return its path."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 512):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_refuses_new_payments_forwards_accepted_ones_and_recovers_by_itself(
        fresh, small_disk, make_instance):
    # Issue 9: with the disk full, attempts could not journal their S record and were retried
    # at once, forever; now the reserve carries the records of payments already accepted.
    default, fallback = fresh
    default.configure(failure=True)
    instance = make_instance("api1", default, fallback, journal_dir=small_disk, JOURNAL_RESERVE_BYTES=65536,
                             BREAKER_RETRY_S=0.05)
    accepted = pay_many(instance, 50, threads=2)
    assert len(accepted) == 50
    with instance.paused():  # the filler must not take the reserve
        filler = fill(small_disk)
    for _ in range(500):  # the journal's last page still has room for a few records
        status, cid = instance.pay()
        if status != 202:
            break
        accepted.append(cid)
    assert status == 503
    assert [instance.pay()[0] for _ in range(5)] == [503] * 5
    default.configure(failure=False)
    assert wait_until(lambda: drained(instance), timeout=10), instance.health()
    assert all(default.stored(cid) for cid in accepted)
    assert_ledger_matches(instance, default, fallback)
    filler.unlink()
    assert wait_until(lambda: instance.pay()[0] == 202, timeout=5)
    assert "unreadable" not in instance.output()
    assert instance.stop() == 0
    instance.start()  # and everything it journaled replays whole
    assert instance.health()["queue"] == 0
    assert_ledger_matches(instance, default, fallback)


def test_confirmed_history_moves_to_the_ledgers_files_and_a_restart_reads_it_back(fresh, make_instance):
    default, fallback = fresh
    instance = make_instance("api1", default, fallback, process=True)  # killed below
    accepted = pay_many(instance, 200, threads=4)
    assert wait_until(lambda: drained(instance))
    frozen = Path(instance.journal + ".ledger.0")
    assert wait_until(lambda: frozen.stat().st_size == 16 * 200, timeout=5)  # out of memory, once a second
    before = assert_ledger_matches(instance, default, fallback)
    instance.process.stop(signal.SIGKILL)
    instance.start()
    assert assert_ledger_matches(instance, default, fallback) == before
    assert before["default"]["totalRequests"] == len(accepted) == 200
    assert b"C " not in Path(instance.journal).read_bytes()  # compacted at start: history is the ledger's


# ---------------------------------------------------------------------------
# Queue
# ---------------------------------------------------------------------------

def test_the_queue_counts_every_unsettled_payment_and_is_nearly_full_by_waiting_ones():
    backlog = rinha.Backlog(rinha.Config(queue_capacity=4, fallback_queue_fraction=0.5))
    payments = [rinha.Payment(seq, b"cid%d" % seq, 100, 1) for seq in range(4)]
    for payment in payments:
        backlog.add(payment)
    backlog.fly(backlog.next_ready(), rinha.DEFAULT, 10)  # in flight...
    backlog.fly(backlog.next_ready(), rinha.DEFAULT, 11)
    backlog.land(payments[1], rinha.PINNED, 1.0)  # ...or pinned count as much as waiting ones
    backlog.check()
    assert backlog.unsettled() == 4 and backlog.full() and backlog.nearly_full()  # 2 of 4 wait
    backlog.fly(backlog.next_ready(), rinha.FALLBACK, 12)
    assert backlog.full() and not backlog.nearly_full()  # 1 waits: under half
    backlog.land(payments[0], rinha.CONFIRMED)
    backlog.check()
    assert backlog.unsettled() == 3 and not backlog.full()


def test_a_full_queue_answers_503_with_retry_after_and_journals_nothing(fresh, make_instance):
    default, fallback = fresh
    default.configure(failure=True)
    fallback.configure(failure=True)
    instance = make_instance("small", default, fallback, QUEUE_CAPACITY=3)
    assert [instance.pay()[0] for _ in range(3)] == [202, 202, 202]
    status, headers, body = call(instance.port, "POST", "/payments",
                                 {"correlationId": str(uuid.uuid4()), "amount": 1})
    assert status == 503 and headers["Retry-After"] == "1"
    assert Path(instance.journal).read_bytes().count(b"\nA ") + \
        Path(instance.journal).read_bytes().startswith(b"A ") == 3


# ---------------------------------------------------------------------------
# Processor client
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("data, expected", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", (200, b"ok", True)),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n3;x=y\r\n!!!\r\n0\r\n\r\n", (200, b"ok!!!", True)),
    (b"HTTP/1.1 500 Oops\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", (500, b"", False)),
    (b"HTTP/1.0 204 No Content\r\n\r\n", (204, b"", False)),
])
def test_parse_response_reads_length_chunked_and_connection(data, expected):
    for cut in range(len(data)):  # incomplete prefixes ask for more
        assert rinha.parse_response(bytearray(data[:cut])) is None
    status, body, keep, consumed = rinha.parse_response(bytearray(data))
    assert (status, body, keep) == expected and consumed == len(data)


def test_upstream_pool_reuses_keep_alive_connections_against_the_emulator(fresh):
    default, _ = fresh

    async def scenario():
        upstream = rinha.Upstream("default", default.url, 10.0)
        for _ in range(5):
            status, body = await upstream.request(b"GET", b"/payments/service-health")
            assert status == 200 and b"failing" in body
        assert len(upstream.idle) == 1
        with pytest.raises(rinha.UpstreamError):
            await rinha.Upstream("nowhere", "http://127.0.0.1:9", 10.0).request(b"GET", b"/")
        upstream.close()
    asyncio.run(scenario())


def test_connections_closed_by_a_restarted_processor_are_replaced_not_fatal(make_processor, make_instance):
    default, fallback = make_processor("0.05"), make_processor("0.15")
    instance = make_instance("api1", default, fallback)
    assert len(pay_many(instance, 40)) == 40
    assert wait_until(lambda: drained(instance))
    default.process.stop()  # every pooled keep-alive connection to it dies while idle
    default = make_processor("0.05", port=default.port)
    assert len(pay_many(instance, 40)) == 40
    assert wait_until(lambda: drained(instance))
    assert default.summary()["totalRequests"] == 40
    assert instance.summary()["default"]["totalRequests"] == 80
    assert instance.summary()["fallback"]["totalRequests"] == 0


# ---------------------------------------------------------------------------
# Router and breaker
# ---------------------------------------------------------------------------

BREAKER_SIGNALS = (rinha.SUCCESS, rinha.FAILURE, rinha.NEUTRAL, rinha.REPORTED_FAILING, rinha.REPORTED_OK)


def test_the_breaker_table_covers_every_state_and_signal_and_no_probe_stays_half_open():
    states = (rinha.CLOSED, rinha.OPEN, rinha.HALF_OPEN)
    assert set(rinha.BREAKER_TRANSITIONS) == {(s, g) for s in states for g in BREAKER_SIGNALS}
    for state in states:
        for learned in BREAKER_SIGNALS:
            breaker = rinha.Breaker(CONFIG)
            breaker.state, breaker.retry_at = state, 5.0
            breaker.observe(learned, 10.0)
            if state is rinha.HALF_OPEN and learned in (rinha.SUCCESS, rinha.FAILURE, rinha.NEUTRAL):
                assert breaker.state is not rinha.HALF_OPEN  # the probe's answer always decides
            if breaker.state is rinha.OPEN:  # an open breaker always has its next probe set
                assert breaker.retry_at >= 5.0 and breaker.allows(breaker.retry_at)
            assert (breaker.state is rinha.CLOSED) == (learned is rinha.SUCCESS or (
                state is rinha.CLOSED and learned in (rinha.FAILURE, rinha.NEUTRAL, rinha.REPORTED_OK)))


def test_the_breaker_opens_after_consecutive_failures_and_lets_one_probe_through():
    breaker = rinha.Breaker(CONFIG)
    for _ in range(CONFIG.breaker_failures):
        assert breaker.allows(0.0)
        breaker.observe(rinha.FAILURE, 0.0)
    assert breaker.state is rinha.OPEN and not breaker.allows(0.0)
    later = CONFIG.breaker_retry_s + 0.01
    assert breaker.allows(later) and breaker.state is rinha.HALF_OPEN
    assert not breaker.allows(later)  # one probe at a time
    breaker.observe(rinha.FAILURE, later)
    assert breaker.state is rinha.OPEN and breaker.down_for(later) == later
    assert breaker.allows(later * 3)
    breaker.observe(rinha.SUCCESS, later * 3)
    assert breaker.state is rinha.CLOSED and breaker.down_for(later * 4) == 0.0


def test_health_reports_open_a_closed_breaker_and_hasten_a_probe():
    breaker = rinha.Breaker(CONFIG)
    breaker.observe(rinha.REPORTED_FAILING, 10.0)
    assert breaker.state is rinha.OPEN and not breaker.allows(10.0)
    breaker.observe(rinha.REPORTED_OK, 10.0)
    assert breaker.allows(10.0)


def settled(state, outcome, journal_path):
    """A pipeline after one attempt of payment seq 7 ended in `outcome`, from `state`."""
    async def run():
        pipeline = rinha.Pipeline(CONFIG, rinha.Journal(str(journal_path), CONFIG), ledger_at(journal_path.parent, journal_path.name + ".ledger"))
        pipeline.journal.open_compacted(pipeline.ledger, {})
        pipeline.running = False  # no attempt starts: only the transition is observed
        payment = rinha.Payment(7, b"cid", 1990, 1000, (rinha.DEFAULT, 555) if state is rinha.PINNED else None, 1.0)
        pipeline.backlog.add(payment)
        taken = pipeline.backlog.next_pinned(rinha.DEFAULT) if state is rinha.PINNED else pipeline.backlog.next_ready()
        pipeline.backlog.fly(taken, rinha.DEFAULT, 555)
        pipeline.backlog.check()
        pipeline.settle(payment, pipeline.lanes[rinha.DEFAULT], state, outcome)
        pipeline.backlog.check()
        return pipeline, payment
    return asyncio.run(run())


def test_the_payment_table_covers_every_state_and_outcome_and_settle_applies_it(tmp_path):
    pairs = [(s, o) for s in (rinha.QUEUED, rinha.PINNED) for o in rinha.ATTEMPT_OUTCOMES]
    pairs += [(rinha.PINNED, o) for o in rinha.LOOKUP_OUTCOMES]
    assert sorted(rinha.PAYMENT_TRANSITIONS) == sorted(pairs)
    for state, outcome in pairs:
        after, signal = rinha.PAYMENT_TRANSITIONS[state, outcome]
        journal = tmp_path / f"{state}-{outcome}".replace(" ", "_").replace(",", "")
        pipeline, payment = settled(state, outcome, journal)
        backlog, breaker = pipeline.backlog, pipeline.lanes[rinha.DEFAULT].breaker
        last = journal.read_bytes().splitlines()[-1] if journal.read_bytes() else b""
        settled_now = after in (rinha.CONFIRMED, rinha.NOT_OURS)
        assert backlog.unsettled() == (0 if settled_now else 1), (state, outcome)
        assert pipeline.ledger.window(rinha.DEFAULT, 555, 555) == ((1, 1990) if after is rinha.CONFIRMED else (0, 0))
        assert last == {rinha.CONFIRMED: b"C 7 0 555 1990 0", rinha.NOT_OURS: b"X 7", rinha.QUEUED: b"U 7",
                        rinha.PINNED: b""}[after], (state, outcome)
        assert (list(backlog.ready) == [payment]) == (after is rinha.QUEUED)
        assert (list(backlog.pinned[rinha.DEFAULT]) == [payment]) == (after is rinha.PINNED)
        if after is rinha.PINNED:
            assert (payment.processor, payment.requested_ms) == (rinha.DEFAULT, 555)
            restarted = state is rinha.QUEUED or outcome in rinha.MAY_LAND_LATER
            assert (payment.settle_from > 1.0) == restarted, (state, outcome)  # from the latest attempt
        else:
            assert backlog.pins() == 0 and (after is not rinha.QUEUED or payment.processor is payment.settle_from is None)
        assert (breaker.failures == 1) == (signal is rinha.FAILURE)
        assert (breaker.failing_since is None) == (signal is not rinha.FAILURE)


def test_the_backlog_check_finds_a_payment_in_two_places_or_with_fields_that_disagree():
    backlog = rinha.Backlog(CONFIG)
    free, pinned = rinha.Payment(1, b"a", 100, 1), rinha.Payment(2, b"b", 100, 1, (rinha.FALLBACK, 9), 5.0)
    backlog.add(free)
    backlog.add(pinned)
    backlog.check()
    assert list(backlog.pinned[rinha.FALLBACK]) == [pinned] and backlog.pins() == 1
    backlog.ready.append(pinned)  # behind the methods' back: in two places
    with pytest.raises(AssertionError):
        backlog.check()
    backlog.ready.pop()
    free.processor = rinha.DEFAULT  # a free payment that names a processor
    with pytest.raises(AssertionError):
        backlog.check()


def test_only_answers_that_cannot_have_stored_free_a_payment_and_only_proof_confirms_it():
    for (state, outcome), (after, _) in rinha.PAYMENT_TRANSITIONS.items():
        if outcome in (rinha.ANSWER_LOST, rinha.CRASHED, rinha.STORED_UNREAD, rinha.UNCHECKED):
            assert after is rinha.PINNED, (state, outcome)  # may be stored: never elsewhere
        if after is rinha.QUEUED and state is rinha.PINNED:
            assert outcome is rinha.ABSENT  # only a settled lookup frees a pinned payment
        assert (after is rinha.CONFIRMED) == (outcome in (rinha.OK, rinha.STORED_OURS, rinha.FOUND_OURS))


def test_a_payment_handed_to_an_attempt_not_yet_running_stays_in_the_snapshot_a_compaction_writes(
        tmp_path):
    config = rinha.Config(default_processor_url=f"http://127.0.0.1:{free_port()}")

    async def run():
        pipeline = rinha.Pipeline(config, rinha.Journal(str(tmp_path / "j"), CONFIG), ledger_at(tmp_path))
        pipeline.journal.open_compacted(pipeline.ledger, {})
        pipeline.accept(b"cid", 1990)
        pipeline.pump()  # off the queue, to an attempt whose task has not run yet
        assert not pipeline.backlog.ready
        snapshot = pipeline.backlog.pending()
        pipeline.running = False
        return snapshot
    (seq, (cid, cents, _, pin)), = asyncio.run(run()).items()
    assert (seq, cid, cents, pin[0]) == (0, b"cid", 1990, rinha.DEFAULT)  # pinned where it went


def test_a_pinned_payment_being_looked_up_stays_in_the_snapshot_a_compaction_writes(tmp_path):
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers: the lookup hangs
    config = rinha.Config(default_processor_url=f"http://127.0.0.1:{silent.getsockname()[1]}",
                          pin_settle_s=0.0, pin_check_interval_s=0.01)

    async def run():
        pipeline = rinha.Pipeline(config, rinha.Journal(str(tmp_path / "j"), CONFIG), ledger_at(tmp_path),
                                  {5: [b"cid", 100, 1, (rinha.DEFAULT, 77)]}, 6)
        pipeline.lanes[rinha.DEFAULT].breaker.state = rinha.OPEN  # so the pin is looked up
        pipeline.lanes[rinha.DEFAULT].breaker.retry_at = 1e12
        checker = asyncio.ensure_future(pipeline.check_pins())
        await asyncio.sleep(0.3)
        assert not pipeline.backlog.pinned[rinha.DEFAULT]  # out of its line: being looked up
        snapshot = pipeline.backlog.pending()
        pipeline.running = False
        checker.cancel()
        return snapshot
    try:
        assert asyncio.run(run()) == {5: [b"cid", 100, 1, (rinha.DEFAULT, 77)]}
    finally:
        silent.close()


def test_nothing_can_still_be_confirmed_below_the_safe_bound_of_each_processor(tmp_path):
    pipeline = rinha.Pipeline(CONFIG, rinha.Journal("/dev/null", CONFIG), ledger_at(tmp_path),
                              {1: [b"a", 100, 1, (rinha.DEFAULT, 5_000)], 2: [b"b", 100, 2, None]}, 3)
    now = rinha.now_ms()
    default_safe, fallback_safe = pipeline.safe_below()
    assert default_safe == 5_000 and fallback_safe >= now  # a pin may still land at its requestedAt
    payment = pipeline.backlog.next_ready()
    pipeline.backlog.fly(payment, rinha.FALLBACK, 7_000)  # an attempt under way
    assert pipeline.safe_below() == [5_000, 7_000]
    pipeline.backlog.land(payment, rinha.CONFIRMED)
    assert pipeline.safe_below()[rinha.FALLBACK] >= now


def test_the_router_waits_for_a_busy_or_briefly_down_default_and_then_takes_the_fallback(tmp_path):
    pipeline = rinha.Pipeline(CONFIG, rinha.Journal("/dev/null", CONFIG), ledger_at(tmp_path))
    default, fallback = pipeline.lanes
    now = 1000.0
    assert pipeline.route(now) is default
    default.in_flight = default.limit  # busy, however slow: never a reason to switch
    assert pipeline.route(now) is None
    default.in_flight = 0
    default.breaker.state, default.breaker.retry_at = rinha.OPEN, now + 10
    default.breaker.failing_since = now - CONFIG.fallback_after_s + 1
    assert pipeline.route(now) is None  # down, not for long yet
    default.breaker.failing_since = now - CONFIG.fallback_after_s
    assert pipeline.route(now) is fallback
    fallback.breaker.state, fallback.breaker.retry_at = rinha.OPEN, now + 10
    assert pipeline.route(now) is None  # both down: hold


def test_idle_the_first_payment_goes_at_once_and_later_ones_wait_for_the_next_batch(fresh, make_instance):
    default, fallback = fresh
    instance = make_instance("api1", default, fallback, FORWARD_BATCH_S=1.0)
    assert instance.pay(str(uuid.uuid4()))[0] == 202  # idle: it goes at once
    for _ in range(3):  # the pump ran a moment ago: these wait for the next one
        assert instance.pay(str(uuid.uuid4()))[0] == 202
    seen = []

    def stored():
        seen.append(default.summary()["totalRequests"])
        return seen[-1]
    assert wait_until(lambda: stored() == 4, timeout=5)
    assert 1 in seen, seen  # the first was there alone before the others came, a batch later
    assert_ledger_matches(instance, default, fallback)


def answer(lane, sent, seconds, status=200):
    """One attempt of `seconds`, sent at `sent` (monotonic seconds), answered with `status`."""
    lane.answered(lane.sending(sent), sent + seconds, status)


def test_the_in_flight_limit_follows_latency_at_once_within_its_bounds_and_halves_on_429():
    lane = rinha.Lane(rinha.DEFAULT, "http://127.0.0.1:9", CONFIG)
    assert lane.limit == CONFIG.in_flight_min
    answer(lane, 0.0, 0.001)  # a millisecond: a batch's worth in flight carries FORWARD_RATE
    assert lane.limit == max(CONFIG.in_flight_min, math.ceil(CONFIG.forward_rate * (lane.latency + CONFIG.forward_batch_s)))
    slow = rinha.Lane(rinha.DEFAULT, "http://127.0.0.1:9", CONFIG)
    answer(slow, 0.0, 2.0)  # issue 16: a 2 s processor got 4, then one more per answer
    assert slow.limit == min(CONFIG.in_flight_cap, math.ceil(CONFIG.forward_rate * (slow.latency + CONFIG.forward_batch_s)))
    for _ in range(100):
        answer(slow, 0.0, 2.0)
    assert slow.limit == CONFIG.in_flight_cap
    slow.throttled()
    assert slow.limit == CONFIG.in_flight_cap // 2
    answer(slow, 0.0, 2.0)
    assert slow.limit == CONFIG.in_flight_cap // 2 + 1  # grows back one per answer


def test_a_lane_keeps_the_promise_only_while_stores_land_within_the_margin():
    lane = rinha.Lane(rinha.DEFAULT, "http://127.0.0.1:9", CONFIG)
    bound = CONFIG.promise_margin_s - CONFIG.promise_headroom_s
    assert lane.check_promise(100.0)
    answer(lane, 100.0, bound - 0.05)
    assert lane.check_promise(102.0) and lane.slow_since is None
    answer(lane, 102.0, bound + 0.05)
    assert not lane.check_promise(104.0) and lane.slow_since == 104.0
    answer(lane, 101.0, 0.01)  # sent before the slow one: older evidence, ignored
    assert not lane.check_promise(104.5) and lane.slow_since == 104.0
    answer(lane, 105.0, 0.01)  # the latest-sent stored attempt was fast
    assert lane.check_promise(105.5) and lane.slow_since is None
    answer(lane, 106.0, 3.0, status=500)  # a failure stores nothing: it says nothing of stores
    assert lane.check_promise(110.0)
    mark = lane.sending(110.0)  # out longer than 3 x 10 ms (and SUSPECT_MIN_S): suspect at once
    assert lane.check_promise(110.0 + CONFIG.suspect_min_s * 0.9)
    assert not lane.check_promise(110.0 + CONFIG.suspect_min_s * 1.1)
    lane.answered(mark, 110.5, None)  # no answer: it leaves the outstanding ones
    assert lane.check_promise(110.6) and not lane.outstanding
    stale = lane.sending(120.0)  # sent while it was slow, still out...
    answer(lane, 120.5, 0.005)  # ...but a later one answered at once: the stale one tells nothing more
    assert lane.check_promise(122.0)
    lane.answered(stale, 122.5, 200)  # its own answer, late, is older evidence than the fast one
    assert lane.check_promise(122.6) and lane.promise_latency == pytest.approx(0.005)
    lane.breaker.state = rinha.OPEN  # a lane that is down is the breaker's business, not slow
    answer(lane, 123.0, 2.0)
    assert not lane.check_promise(126.0) and lane.slow_since is None


def test_the_router_moves_off_a_slow_default_after_the_hold_probing_it_and_returns_when_it_is_fast(tmp_path):
    pipeline = rinha.Pipeline(CONFIG, rinha.Journal("/dev/null", CONFIG), ledger_at(tmp_path))
    default, fallback = pipeline.lanes
    now = 1000.0
    answer(default, now - 3.0, 3.0)  # a store took 3 s: past the margin, and past what summaries wait for
    assert not default.check_promise(now) and fallback.check_promise(now)
    assert pipeline.route(now) is default  # nothing out there: one probe learns the latency
    probe = default.sending(now)
    default.in_flight = 1
    assert pipeline.route(now) is None  # held: it may be a blip
    later = now + CONFIG.promise_hold_s
    default.check_promise(later)
    assert pipeline.route(later) is fallback
    fallback.in_flight = fallback.limit
    assert pipeline.route(later) is None  # the fallback is busy: wait for it, not for the default
    fallback.in_flight = 0
    default.answered(probe, later + 0.5, 200)  # the probe (sent at `now`) took 1.5 s: still slow
    default.in_flight = 0
    assert not default.check_promise(later + 0.5) and pipeline.route(later + 0.5) is default
    answer(default, later + 0.6, 0.005)  # the next probe is fast: the default again
    assert default.check_promise(later + 0.7) and pipeline.route(later + 0.7) is default


def test_a_slow_default_whose_late_stores_summaries_wait_for_is_probed_every_probe_interval(tmp_path):
    pipeline = rinha.Pipeline(CONFIG, rinha.Journal("/dev/null", CONFIG), ledger_at(tmp_path))
    default, fallback = pipeline.lanes
    now = 1000.0
    answer(default, now - 2.0, 2.0)  # 2 s: past the margin, within PROMISE_MARGIN_S + SUMMARY_WAIT_S
    assert not default.check_promise(now) and fallback.check_promise(now)
    assert pipeline.route(now) is default
    default.in_flight = 1
    assert pipeline.route(now) is None  # held, and the next probe not due yet
    assert pipeline.route(now + CONFIG.probe_interval_s) is default  # another, the first still out
    assert pipeline.route(now + CONFIG.probe_interval_s) is None


def test_when_neither_processor_keeps_the_promise_the_default_takes_payments_after_fallback_after_s(tmp_path):
    pipeline = rinha.Pipeline(CONFIG, rinha.Journal("/dev/null", CONFIG), ledger_at(tmp_path))
    default, fallback = pipeline.lanes
    now = 1000.0
    for lane in pipeline.lanes:
        answer(lane, now - 3.0, 3.0)
        lane.check_promise(now)
    default.in_flight = 1  # the probe
    assert pipeline.route(now + CONFIG.promise_hold_s) is None
    default.check_promise(now + CONFIG.fallback_after_s)
    assert pipeline.route(now + CONFIG.fallback_after_s) is default  # late but paid beats held
    answer(fallback, now, 0.001)  # fast again, but down: no better than slow
    fallback.breaker.state, fallback.breaker.retry_at = rinha.OPEN, now + 100
    assert fallback.check_promise(now) and pipeline.route(now + CONFIG.promise_hold_s) is None


def test_two_instances_polling_health_never_draw_a_429_and_see_failure_and_recovery(make_processor, make_instance):
    # Each instance keeps at most one health call outstanding per processor, and the processor
    # answers one per window while letting two wait: two instances fit whatever the interval
    # (three asking this often do draw 429s). Scaled down: a 0.5 s window instead of 5 s.
    default = make_processor("0.05", "--health-window-s", "0.5")
    fallback = make_processor("0.15", "--health-window-s", "0.5")
    instances = [make_instance(f"api{i}", default, fallback, HEALTH_INTERVAL_S=0.1) for i in (1, 2)]
    default.configure(failure=True)
    assert wait_until(lambda: all(i.health()["default"]["reported_failing"] for i in instances), timeout=5)
    assert all(i.health()["default"]["breaker"] != rinha.CLOSED for i in instances)
    default.configure(failure=False)
    assert wait_until(lambda: not any(i.health()["default"]["reported_failing"] for i in instances), timeout=5)
    time.sleep(2)  # lets four windows pass: no 429 may come in them
    for instance in instances:
        instance.stop()
        assert "status 429" not in instance.output()
        assert "health of" not in instance.output()


# ---------------------------------------------------------------------------
# The pipeline against the processor emulator
# ---------------------------------------------------------------------------

def test_payments_go_to_the_default_and_the_summary_matches_it_to_the_cent(fresh, make_instance):
    default, fallback = fresh
    instance = make_instance("api1", default, fallback)
    accepted = pay_many(instance, 400)
    assert len(accepted) == 400
    assert wait_until(lambda: drained(instance))
    mine = assert_ledger_matches(instance, default, fallback)
    assert mine["default"]["totalRequests"] == 400 and mine["fallback"]["totalRequests"] == 0
    now = time.time()
    window = f"?from={time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(now - 60))}.000Z" \
             f"&to={time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(now + 1))}.000Z"
    assert_ledger_matches(instance, default, fallback, window)


def test_a_slow_default_is_waited_for_not_replaced_by_the_fallback(fresh, make_instance):
    default, fallback = fresh
    default.configure(delay=300)
    instance = make_instance("api1", default, fallback)
    assert len(pay_many(instance, 100)) == 100
    assert wait_until(lambda: drained(instance))
    mine = assert_ledger_matches(instance, default, fallback)
    assert mine["default"]["totalRequests"] == 100 and mine["fallback"]["totalRequests"] == 0


def test_a_failing_default_is_waited_for_within_fallback_after_s_then_drained(fresh, make_instance):
    default, fallback = fresh
    default.configure(failure=True)
    instance = make_instance("api1", default, fallback)
    assert len(pay_many(instance, 100)) == 100
    assert wait_until(lambda: instance.health()["default"]["breaker"] != rinha.CLOSED)
    time.sleep(1.0)  # lets time pass: within FALLBACK_AFTER_S nothing may leave for the fallback
    health = instance.health()  # one reading: a probe may start or end between two
    assert health["queue"] + health["in_flight"] == 100
    assert instance.health()["default"]["breaker"] != rinha.CLOSED
    default.configure(failure=False)
    assert wait_until(lambda: drained(instance), timeout=10)
    mine = assert_ledger_matches(instance, default, fallback)
    assert mine["default"]["totalRequests"] == 100 and mine["fallback"]["totalRequests"] == 0


def test_a_default_down_longer_than_fallback_after_s_hands_everything_to_the_fallback_until_it_recovers(
        fresh, make_instance):
    default, fallback = fresh
    default.configure(failure=True)
    instance = make_instance("api1", default, fallback, FALLBACK_AFTER_S=1)
    assert len(pay_many(instance, 50)) == 50
    time.sleep(0.5)  # lets half of FALLBACK_AFTER_S pass: nothing may reach the fallback yet
    assert fallback.summary()["totalRequests"] == 0  # not yet: the default may come back
    assert wait_until(lambda: drained(instance), timeout=10)
    assert len(pay_many(instance, 20)) == 20  # still down: new payments go straight there
    assert wait_until(lambda: drained(instance), timeout=5)
    assert fallback.summary()["totalRequests"] == 70
    default.configure(failure=False)
    # Lets the breaker's BREAKER_RETRY_S pass since its last failed probe (it shows nowhere):
    # sent sooner, this payment would find the default still down and go to the fallback.
    time.sleep(CONFIG.breaker_retry_s * 2)
    assert instance.pay()[0] == 202  # the next probe of the default carries this one
    assert wait_until(lambda: drained(instance) and instance.health()["default"]["breaker"] == rinha.CLOSED)
    assert len(pay_many(instance, 20)) == 20  # back: the default takes them again
    assert wait_until(lambda: drained(instance), timeout=5)
    assert default.summary()["totalRequests"] == 21
    assert_ledger_matches(instance, default, fallback)


def test_a_nearly_full_queue_sends_to_the_fallback_before_the_hold_time(fresh, make_instance):
    default, fallback = fresh
    default.configure(failure=True)
    instance = make_instance("api1", default, fallback, QUEUE_CAPACITY=40, FALLBACK_QUEUE_FRACTION=0.5)
    assert len(pay_many(instance, 30, threads=3)) == 30
    # Above 20 queued the fallback takes payments; below it the rest wait for the default.
    assert wait_until(lambda: sum(map(instance.health().get, ("queue", "in_flight"))) <= 20, timeout=5)
    assert wait_until(lambda: instance.health()["fallback"]["in_flight"] == 0
                      and fallback.summary()["totalRequests"] >= 10)  # what was sent there has landed
    assert 10 <= fallback.summary()["totalRequests"] <= 12  # the excess, give or take a worker's race
    default.configure(failure=False)
    assert wait_until(lambda: drained(instance), timeout=10)
    mine = assert_ledger_matches(instance, default, fallback)
    assert mine["default"]["totalRequests"] + mine["fallback"]["totalRequests"] == 30
    assert mine["fallback"]["totalRequests"] <= 12  # none more once the queue was below the fraction


def test_a_summary_waits_for_an_attempt_that_may_still_store_inside_the_window_it_answers_for(
        fresh, make_instance):
    # Issue 16: a processor slower than the margin stored payments inside a window the
    # summary had already answered for; the processors' summary, asked just after, counted them.
    default, fallback = fresh
    default.configure(delay=1800)  # the router is told it keeps the promise, so it sends there
    instance = make_instance("api1", default, fallback, PROMISE_HEADROOM_S=-1)
    sent = time.time()
    assert instance.pay()[0] == 202  # idle: it goes at once, stored about 1.8 s later
    window = window_query(sent + 1.6)  # ends 0.1 s after it was sent...
    time.sleep(max(0.0, sent + 1.6 - time.time()))  # ...and is 1.5 s old from here on: no event to wait on
    assert default.summary(window)["totalRequests"] == 0  # not stored yet
    mine = instance.summary(window)  # waits for the attempt's answer, then counts it
    assert mine["default"]["totalRequests"] == default.summary(window)["totalRequests"] == 1


def test_a_default_slower_than_the_margin_loses_new_payments_to_the_fallback_until_it_is_fast(fresh, make_instance):
    # Issue 16: a healthy default answering in 2 s was waited for; its stores landed inside
    # windows the summary had already answered (162 inconsistencies in a contest run).
    default, fallback = fresh
    default.configure(delay=1600)
    instance = make_instance("api1", default, fallback)
    first = pay_many(instance, 5)  # these go before anything is known: the default
    assert wait_until(lambda: default.summary()["totalRequests"] == 5)
    later = []
    for _ in range(10):  # a steady trickle, as clients send
        later += pay_many(instance, 5, threads=5)
        time.sleep(0.2)  # paces the trickle: time passes between payments, as with real clients
    assert wait_until(lambda: drained(instance))
    mine = assert_ledger_matches(instance, default, fallback)
    assert len(first + later) == 55 and mine["default"]["totalRequests"] + mine["fallback"]["totalRequests"] == 55
    assert mine["fallback"]["totalRequests"] >= 40, mine  # all but the probes and the hold's
    default.configure(delay=0)  # the next probe learns it: the default again
    for _ in range(4):
        assert len(pay_many(instance, 5, threads=5)) == 5
        time.sleep(0.2)  # paces the trickle, as above
    assert wait_until(lambda: drained(instance))
    after = assert_ledger_matches(instance, default, fallback)
    assert after["default"]["totalRequests"] >= mine["default"]["totalRequests"] + 15, (mine, after)
    assert instance.health()["default"]["keeps_promise"]


def test_a_slow_default_that_keeps_the_promise_gets_what_its_latency_needs_in_flight_at_once(fresh, make_instance):
    # Issue 16: the in-flight limit started at 4 and grew by one per answer (and stopped at
    # 300), so a slow but healthy default turned into a backlog.
    default, fallback = fresh
    default.configure(delay=1200)
    instance = make_instance("api1", default, fallback, PROMISE_HEADROOM_S=0)
    pay_many(instance, 2, threads=1)  # the first answer tells the latency
    assert wait_until(lambda: instance.health()["default"]["latency_ms"] > 0, timeout=5)
    assert len(pay_many(instance, 400, threads=16)) == 400
    most = 0
    while not drained(instance):
        most = max(most, instance.health()["in_flight"])
    assert most >= 300, most  # not 4, 5, 6... a slow start would have taken seconds
    mine = assert_ledger_matches(instance, default, fallback)
    assert mine["default"]["totalRequests"] == 402 and mine["fallback"]["totalRequests"] == 0


def test_processors_on_unix_sockets_are_reached(tmp_path, make_processor, make_instance):
    default = make_processor("0.05", unix=tmp_path / "default.sock")
    fake_fallback = type("Address", (), {"url": "http://127.0.0.1:9"})
    instance = make_instance("api1", default, fake_fallback)
    assert len(pay_many(instance, 20, threads=2)) == 20
    assert wait_until(lambda: drained(instance))
    assert instance.summary()["default"]["totalRequests"] == 20


def test_both_processors_down_holds_everything_and_loses_nothing(fresh, make_instance):
    default, fallback = fresh
    default.configure(failure=True)
    fallback.configure(failure=True)
    instance = make_instance("api1", default, fallback, FALLBACK_AFTER_S=0.5)
    accepted = pay_many(instance, 80)
    time.sleep(1.5)  # lets FALLBACK_AFTER_S pass three times: still nothing may be counted
    assert instance.summary()["default"]["totalRequests"] == 0
    fallback.configure(failure=False)
    default.configure(failure=False)
    assert wait_until(lambda: drained(instance), timeout=10)
    assert_ledger_matches(instance, default, fallback)
    assert all(default.stored(cid) or fallback.stored(cid) for cid in accepted)


def test_a_timed_out_attempt_is_retried_on_the_same_processor_and_counted_once(make_processor, make_instance):
    # Own processors: abandoned attempts still sleeping in them must not land in other tests.
    default, fallback = make_processor("0.05"), make_processor("0.15")
    default.configure(delay=800)
    instance = make_instance("api1", default, fallback, PROCESSOR_TIMEOUT_S=0.3, FALLBACK_AFTER_S=0.5)
    accepted = pay_many(instance, 20, threads=4)
    assert wait_until(lambda: instance.health()["pinned"] > 0, timeout=5)
    pinned = instance.health()["pinned"]
    time.sleep(1.0)  # lets the default stay down longer than FALLBACK_AFTER_S: the unpinned may go to the fallback
    default.configure(delay=0)
    assert wait_until(lambda: drained(instance), timeout=15)
    # Abandoned attempts still inside the emulator land: each payment is stored somewhere once.
    assert wait_until(lambda: default.summary()["totalRequests"] + fallback.summary()["totalRequests"] == 20)
    mine = assert_ledger_matches(instance, default, fallback)
    assert mine["default"]["totalRequests"] >= pinned  # a pinned payment never goes elsewhere
    assert mine["default"]["totalRequests"] + mine["fallback"]["totalRequests"] == 20
    assert all(default.stored(cid) != fallback.stored(cid) for cid in accepted)  # once, in one place


def test_a_duplicate_correlation_id_is_forwarded_once_and_counted_once(fresh, make_instance):
    default, fallback = fresh
    instance = make_instance("api1", default, fallback)
    cid = str(uuid.uuid4())
    assert instance.pay(cid)[0] == 202
    assert wait_until(lambda: drained(instance))
    assert instance.pay(cid)[0] == 202  # the same payment again: answered, not queued twice
    assert wait_until(lambda: drained(instance) and instance.health()["duplicates"] == 1)
    mine = assert_ledger_matches(instance, default, fallback)
    assert mine["default"]["totalRequests"] == 1


def test_an_id_sent_again_while_the_default_is_down_is_not_stored_by_the_fallback_too(fresh, make_instance):
    # A client retrying sends the same id again; each copy used to be routed on its own, so
    # with the default down long enough the second went to the fallback: stored in both.
    default, fallback = fresh
    instance = make_instance("api1", default, fallback, FALLBACK_AFTER_S=0.3, BREAKER_RETRY_S=0.05)
    cid = str(uuid.uuid4())
    assert instance.pay(cid)[0] == 202
    assert wait_until(lambda: drained(instance))
    default.configure(failure=True)
    assert instance.pay()[0] == 202  # another payment: it finds the default down
    # ...and after FALLBACK_AFTER_S the fallback takes it: the default counts as down for long.
    assert wait_until(lambda: fallback.summary()["totalRequests"] == 1, timeout=5)
    assert instance.pay(cid, amount=19.90)[0] == 202

    assert wait_until(lambda: drained(instance), timeout=5)
    default.configure(failure=False)
    assert default.stored(cid) and not fallback.stored(cid)
    assert_ledger_matches(instance, default, fallback)


class ScriptedProcessor:
    """A fake processor for what the emulator cannot do on demand. Per attempt, from its
    script: "ok", "429", "500", "422" (without storing), "drop" (close without storing),
    "store-and-drop", "late:S" (store S seconds later, never answer), or
    "drop-then-another-client-stores-it". After the script, "ok". stop() refuses connections."""

    def __init__(self, script):
        self.script = list(script)
        self.stored = {}
        self.attempts = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self.accept, daemon=True).start()

    def stop(self):
        self.server.close()

    def accept(self):
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(connection,), daemon=True).start()

    def serve(self, connection):
        buffer = b""
        with connection:
            while True:
                while b"\r\n\r\n" not in buffer:
                    chunk = connection.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                while len(buffer) < length:
                    buffer += connection.recv(65536)
                body, buffer = buffer[:length], buffer[length:]
                if head.startswith(b"GET /payments/"):
                    found = self.stored.get(head.split(b" ")[1][len(b"/payments/"):].decode())
                    answer = json.dumps(found).encode() if found else b""
                    connection.sendall(b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (
                        b"200 OK" if found else b"404 Not Found", len(answer), answer))
                    continue
                payment = json.loads(body)
                self.attempts += 1
                action = self.script.pop(0) if self.script else "ok"
                if action in ("429", "500", "422"):
                    connection.sendall(b"HTTP/1.1 %s Scripted\r\nContent-Length: 0\r\n\r\n" % action.encode())
                    continue
                if action.startswith("late:"):
                    threading.Timer(float(action[5:]), self.stored.setdefault,
                                    (payment["correlationId"], payment)).start()
                    return
                if action == "drop":
                    return
                if action == "drop-then-another-client-stores-it":
                    self.stored[payment["correlationId"]] = {**payment, "requestedAt": "2000-01-01T00:00:00.000Z"}
                    return
                cid = payment["correlationId"]
                if cid in self.stored:
                    connection.sendall(b"HTTP/1.1 422 Duplicate\r\nContent-Length: 0\r\n\r\n")
                    continue
                self.stored[cid] = payment
                if action == "store-and-drop":
                    return
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")


def test_429s_and_dropped_connections_before_or_after_storing_count_each_payment_once(fresh, make_instance):
    _, fallback = fresh
    scripted = ScriptedProcessor(["429", "drop", "store-and-drop", "429", "store-and-drop", "drop"])
    instance = make_instance("api1", scripted, fallback, IN_FLIGHT_CAP=1, BREAKER_RETRY_S=0.05)
    cids = [instance.pay()[1] for _ in range(4)]
    assert wait_until(lambda: drained(instance), timeout=10)
    assert sorted(scripted.stored) == sorted(cids)
    mine = instance.summary()
    assert mine["default"]["totalRequests"] == 4 and mine["fallback"]["totalRequests"] == 0
    for stamp in {p["requestedAt"] for p in scripted.stored.values()}:  # the same requestedAt
        same = sum(p["requestedAt"] == stamp for p in scripted.stored.values())
        assert instance.summary(f"?from={stamp}&to={stamp}")["default"]["totalRequests"] == same
    assert not scripted.script  # every scripted fault was met


def test_a_pinned_payment_stored_meanwhile_by_another_request_is_not_counted(fresh, make_instance):
    _, fallback = fresh
    scripted = ScriptedProcessor(["drop-then-another-client-stores-it"])
    instance = make_instance("api1", scripted, fallback, IN_FLIGHT_CAP=1, BREAKER_RETRY_S=0.05)
    instance.pay()
    assert wait_until(lambda: drained(instance) and instance.health()["duplicates"] == 1, timeout=10)
    assert instance.summary()["default"]["totalRequests"] == 0


def test_a_probe_answered_422_closes_the_breaker_instead_of_leaving_it_half_open(fresh, make_instance):
    # Issue 8: a half-open probe that ended in a 422 left the breaker half-open for good.
    _, fallback = fresh
    scripted = ScriptedProcessor(["500", "500", "500", "422"])
    instance = make_instance("api1", scripted, fallback, BREAKER_RETRY_S=0.05)
    instance.pay()
    assert wait_until(lambda: scripted.attempts >= 4, timeout=5)
    cids = [instance.pay()[1] for _ in range(10)]
    assert wait_until(lambda: all(cid in scripted.stored for cid in cids), timeout=5), scripted.attempts
    assert fallback.summary()["totalRequests"] == 0


def test_a_default_refusing_connections_pins_nothing_and_the_fallback_takes_over(fresh, make_instance):
    # Issue 8: "connection refused" pinned payments as if sent, and one held payment at the
    # head of the queue kept every worker busy: nothing reached the fallback.
    _, fallback = fresh
    closed = type("Address", (), {"url": f"http://127.0.0.1:{free_port()}"})
    instance = make_instance("api1", closed, fallback, FALLBACK_AFTER_S=0.5)
    accepted = pay_many(instance, 100)
    assert wait_until(lambda: drained(instance), timeout=10), instance.health()
    assert instance.health()["pinned"] == 0
    assert fallback.summary()["totalRequests"] == 100
    assert all(fallback.stored(cid) for cid in accepted)


def test_a_payment_pinned_to_an_unreachable_fallback_does_not_hold_up_the_default(fresh, make_instance):
    # Issue 8: a pinned payment at the head of the queue stalled every payment behind it.
    default, _ = fresh
    default.configure(failure=True)
    scripted = ScriptedProcessor(["drop"] * 1000)
    # One attempt at a time per processor (WORKERS=1 in the worker pool this replaced).
    instance = make_instance("api1", default, scripted, FALLBACK_AFTER_S=0.3,
                   BREAKER_RETRY_S=0.05, IN_FLIGHT_CAP=1)
    instance.pay()
    assert wait_until(lambda: instance.health()["pinned"] == 1, timeout=5)
    scripted.stop()  # the fallback now refuses connections; the pinned payment must wait
    default.configure(failure=False)
    cids = [instance.pay()[1] for _ in range(20)]
    assert wait_until(lambda: all(default.stored(cid) for cid in cids), timeout=5), instance.health()
    assert instance.health()["pinned"] == 1


def test_a_pin_settles_from_its_latest_attempt_and_a_found_payment_is_confirmed(fresh, make_instance):
    # Issue 8: the settle time ran from the first attempt, so a retry still inside the
    # processor could be declared absent and sent to the fallback too (twice forwarded);
    # and a GET that found the payment confirmed nothing.
    _, fallback = fresh
    scripted = ScriptedProcessor(["drop", "late:1.5"] + ["500"] * 1000)
    instance = make_instance("api1", scripted, fallback, PIN_SETTLE_S=2, BREAKER_RETRY_S=1,
                   BREAKER_FAILURES=1, PROCESSOR_TIMEOUT_S=0.3, FALLBACK_AFTER_S=0.5)
    _, cid = instance.pay()
    assert wait_until(lambda: cid in scripted.stored, timeout=5)
    assert wait_until(lambda: drained(instance) and instance.health()["pinned"] == 0, timeout=10)
    assert not fallback.stored(cid)
    assert instance.summary()["default"]["totalRequests"] == 1
    assert instance.summary()["fallback"]["totalRequests"] == 0


def test_an_unexpected_exception_in_an_attempt_strands_no_payment(monkeypatch, fresh, make_instance):
    # Issue 8: an exception other than OSError/RuntimeError/ValueError ended a worker for
    # good, with the payment it held. Injected: the first request body cannot be built.
    # (monkeypatch first: its teardown, undoing the fault, comes after the instance's stop.)
    default, fallback = fresh
    real, calls = rinha.cents_text, []

    def flaky(cents):
        if getattr(rinha.LOG, "name", None) != "api1":  # only in this test's instance
            return real(cents)
        calls.append(cents)
        if len(calls) == 1:
            raise TypeError("injected")
        return real(cents)
    monkeypatch.setattr(rinha, "cents_text", flaky)
    instance = make_instance("api1", default, fallback, IN_FLIGHT_CAP=1)
    accepted = [instance.pay()[1] for _ in range(5)]
    assert wait_until(lambda: drained(instance), timeout=10), instance.health()
    assert "failed unexpectedly: TypeError('injected')" in instance.output()  # the fault was met
    assert all(default.stored(cid) for cid in accepted)
    assert_ledger_matches(instance, default, fallback)


def test_sigkill_under_load_then_restart_loses_and_duplicates_nothing(fresh, make_instance):
    default, fallback = fresh
    default.configure(delay=40)
    instance = make_instance("api1", default, fallback, process=True)  # killed
    outcome = []
    sender = threading.Thread(target=lambda: outcome.extend(send_payments(instance, 3000)))
    sender.start()
    assert wait_until(lambda: instance.health()["accepted"] >= 200)  # under load
    instance.stop(signal.SIGKILL)
    sender.join()
    accepted, failed = outcome
    assert 0 < len(accepted) < 3000 and len(accepted) + len(failed) == 3000
    assert all(isinstance(error, str) for error in failed), set(failed)  # cut off by the kill, no refusal
    instance.start()
    default.configure(delay=0)
    assert wait_until(lambda: drained(instance), timeout=15)
    assert_ledger_matches(instance, default, fallback)
    assert all(default.stored(cid) for cid in accepted)


def test_a_journaled_backlog_larger_than_the_queue_capacity_is_restored_whole(fresh, make_instance):
    default, fallback = fresh
    default.configure(failure=True)
    instance = make_instance("api1", default, fallback, SHUTDOWN_GRACE_S=0)
    accepted = pay_many(instance, 60)
    assert instance.stop() == 0
    default.configure(failure=False)
    instance.env["QUEUE_CAPACITY"] = "25"  # restarted with a smaller queue than its backlog
    instance.start()
    assert wait_until(lambda: drained(instance), timeout=10)
    assert_ledger_matches(instance, default, fallback)
    assert instance.summary()["default"]["totalRequests"] == 60
    assert all(default.stored(cid) for cid in accepted)
    assert instance.pay()[0] == 202  # room again once drained


def test_sigterm_drains_what_it_can_and_journals_the_rest_for_the_next_start(fresh, make_instance):
    # A slow default, four attempts at a time: 40 payments take 3 s, the grace is 1 s.
    default, fallback = fresh
    default.configure(delay=300)
    fallback.configure(failure=True)
    instance = make_instance("api1", default, fallback, process=True,  # SIGTERM
                             SHUTDOWN_GRACE_S=1, IN_FLIGHT_CAP=4)
    accepted = pay_many(instance, 40)
    before = default.summary()["totalRequests"]
    assert instance.stop() == 0  # by itself, at the end of the grace (20 s, then a SIGKILL)
    left = int(re.search(r"(\d+) payments left in the journal", instance.output()).group(1))
    drained_in_grace = default.summary()["totalRequests"]
    assert drained_in_grace > before and 0 < left < 40, (before, drained_in_grace, left)
    assert drained_in_grace >= 40 - left  # what is not left was confirmed (the rest may still land)
    default.configure(delay=0)
    fallback.configure(failure=False)
    instance.start()
    assert f"journal replayed: {left} payments requeued" in instance.output()
    assert wait_until(lambda: drained(instance), timeout=10)
    assert_ledger_matches(instance, default, fallback)
    assert instance.summary()["default"]["totalRequests"] == 40
    assert all(default.stored(cid) for cid in accepted)


# ---------------------------------------------------------------------------
# Cross-instance summary and purge
# ---------------------------------------------------------------------------

def ready(instance):
    return call(instance.port, "GET", "/internal/ready")[0] == 200


def assert_every_summary_exact(instances, default, fallback, count):
    """Each instance's summary equals the processors', to the cent, as soon as it answers."""
    for instance in instances:
        assert instance.summary()["default"]["totalRequests"] == count
        assert_ledger_matches(instance, default, fallback)


def streamed(instances):
    """Whether every instance holds a whole replica of every other's log. A summary asks the
    peers that answer; the replica stands in only for one that does not (killed or hung)."""
    own = {i.name: sum(i.health()[name]["ledger_requests"] for name in ("default", "fallback")) for i in instances}
    return all(i.health()["replicas"] == {name: count for name, count in own.items() if name != i.name}
               for i in instances)


def test_the_summary_stays_exact_while_a_peer_is_killed_or_hung_and_catches_up_after_its_restart(
        fresh, make_peers):
    # Issue 9: with a peer down the summary answered 502, which the contest counts as zeros.
    default, fallback = fresh
    instances = make_peers(default, fallback, count=3, process=True)  # killed, hung
    for instance in instances:
        pay_many(instance, 30, threads=3)
    assert all(wait_until(lambda: drained(instance)) for instance in instances)
    assert wait_until(lambda: all(i.summary()["default"]["totalRequests"] == 90 for i in instances))
    assert_every_summary_exact(instances, default, fallback, 90)
    assert wait_until(lambda: streamed(instances))

    instances[2].stop(signal.SIGKILL)  # everything it confirmed was streamed
    assert_every_summary_exact(instances[:2], default, fallback, 90)
    pay_many(instances[0], 20, threads=2)  # the live ones go on
    assert wait_until(lambda: drained(instances[0]))
    assert wait_until(lambda: instances[1].summary()["default"]["totalRequests"] == 110)
    assert_every_summary_exact(instances[:2], default, fallback, 110)

    instances[2].start()  # its replicas come from the peers again before it is ready
    assert wait_until(lambda: ready(instances[2]))
    assert_every_summary_exact(instances, default, fallback, 110)
    pay_many(instances[2], 10, threads=2)  # ...and it streams what it confirms afresh
    assert wait_until(lambda: drained(instances[2]))
    assert wait_until(lambda: all(i.summary()["default"]["totalRequests"] == 120 for i in instances))

    assert wait_until(lambda: streamed(instances))
    instances[1].process.popen.send_signal(signal.SIGSTOP)  # hung: neither answers nor closes
    assert_every_summary_exact([instances[0], instances[2]], default, fallback, 120)
    pay_many(instances[0], 10, threads=2)
    assert wait_until(lambda: drained(instances[0]))
    assert wait_until(lambda: instances[2].summary()["default"]["totalRequests"] == 130)
    assert_every_summary_exact([instances[0], instances[2]], default, fallback, 130)
    instances[1].process.popen.send_signal(signal.SIGCONT)  # (make_peers' teardown does it too)
    # Hung longer than STALL_S, it refuses reads for a tick after it resumes (503).
    assert wait_until(lambda: call(instances[1].port, "GET", "/payments-summary")[0] == 200)
    assert wait_until(lambda: instances[1].summary()["default"]["totalRequests"] == 130)
    assert_every_summary_exact(instances, default, fallback, 130)


def accepted(instance):
    """Its count of accepted payments, or -1 while it refuses reads (503: just resumed from a hang)."""
    status, _, body = call(instance.port, "GET", "/health")
    return json.loads(body)["accepted"] if status == 200 else -1


def window_query(now):

    """The contest's consistency window, [now - 15 s, now - 1.5 s], as its script writes it."""
    def iso(seconds):  # as rinha.iso_ms writes it, without its cache, which in-process instances' threads share
        second, milli = divmod(int(seconds * 1000), 1000)
        return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(second))}.{milli:03d}Z"
    return f"?from={iso(now - 15)}&to={iso(now - 1.5)}"


class Load:
    """Threads POSTing payments through the load balancer, each with the contest's 1.5 s
    client timeout, until stopped; records every outcome with its time and duration."""

    def __init__(self, port, threads=6, pause=0.0):
        self.port, self.pause = port, pause
        self.outcomes = []  # (started, seconds, status or the exception's name)
        self.running = True
        self.threads = [threading.Thread(target=self.run) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def run(self):
        while self.running:
            started = time.monotonic()
            try:
                status = call(self.port, "POST", "/payments", {"correlationId": str(uuid.uuid4()),
                                                               "amount": 19.9}, timeout=1.5)[0]
            except (OSError, http.client.HTTPException) as error:
                status = type(error).__name__
            self.outcomes.append((started, time.monotonic() - started, status))
            time.sleep(self.pause)

    def stop(self):
        self.running = False
        for thread in self.threads:
            thread.join()
        return self.outcomes


@pytest.fixture
def make_load():
    """make_load(port, threads=6, pause=0.0): a Load, stopped at teardown if the test did not."""
    started = []

    def make(*args, **kwargs):
        started.append(Load(*args, **kwargs))
        return started[-1]
    yield make
    for load in started:
        load.stop()


@pytest.fixture

def pair_behind_haproxy(fresh, tmp_path, make_peers, make_balancer):
    """Two peered instances on api1.sock and api2.sock (and a port each) behind haproxy.cfg;
    processes, as the tests that use it kill or hang one."""
    instances = make_peers(*fresh, sockets=True, process=True)
    return instances, make_balancer(tmp_path)


def test_remembered_ids_survive_restarts_and_compactions_of_both_instances(fresh, make_peers):
    # Found by make chaos SEED=6: a client's retry seconds after the first copy, with the
    # instance restarted in between, was taken again: a restart remembered pending ids only.
    default, fallback = fresh
    instances = make_peers(default, fallback, process=True)  # killed
    cid = str(uuid.uuid4())
    assert instances[0].pay(cid)[0] == 202
    assert wait_until(lambda: drained(instances[0]))
    # The id reaches the peer with the exchange that carries the confirmation, or before it.
    assert wait_until(lambda: instances[1].health()["replicas"] == {instances[0].name: 1})
    for _ in range(2):  # each start replays the journal, then compacts it
        for instance in instances:
            instance.stop(signal.SIGKILL)
            instance.start()
    for instance in instances:  # learnt from the peer, or accepted here: the same payment
        assert instance.pay(cid)[0] == 202
        assert instance.health()["accepted"] == 0 and instance.health()["duplicates"] == 1
    assert default.summary()["totalRequests"] == 1


def test_a_retry_through_haproxy_on_either_instance_is_not_forwarded_again(fresh, tmp_path, make_peers,
                                                                            make_balancer):
    # haproxy sends a client's retry to either instance; the one that had not accepted the id
    # did not know it and, with the default down long enough, forwarded the copy to the
    # fallback (stored in both). Instances now tell each other the ids they accept.
    default, fallback = fresh
    instances = make_peers(default, fallback, sockets=True, FALLBACK_AFTER_S=0.3, BREAKER_RETRY_S=0.05)
    balancer = make_balancer(tmp_path)
    retried = [str(uuid.uuid4()) for _ in range(20)]
    for cid in retried:
        assert call(balancer.port, "POST", "/payments", {"correlationId": cid, "amount": 10.0})[0] == 202
    assert all(wait_until(lambda: drained(instance)) for instance in instances)
    default.configure(failure=True)
    for _ in range(11):  # others, so each instance finds the default down (odd: round-robin
        # then sends every retry below to the other instance than its first copy)
        assert call(balancer.port, "POST", "/payments", {"correlationId": str(uuid.uuid4()), "amount": 1})[0] == 202
    # Down longer than FALLBACK_AFTER_S on both instances: the fallback has taken those 11.
    assert wait_until(lambda: fallback.summary()["totalRequests"] == 11, timeout=5)
    for cid in retried:
        assert call(balancer.port, "POST", "/payments", {"correlationId": cid, "amount": 10.0})[0] == 202
    assert all(wait_until(lambda: drained(instance), timeout=10) for instance in instances)
    default.configure(failure=False)
    assert [cid for cid in retried if fallback.stored(cid)] == []
    assert all(default.stored(cid) for cid in retried)
    # The peer's confirmations reach this instance's summary within REPLICA_INTERVAL_S.
    assert wait_until(lambda: instances[0].summary()["fallback"]["totalRequests"]
                      == fallback.summary()["totalRequests"])
    assert_ledger_matches(instances[0], default, fallback)


def test_what_a_hung_instance_reads_when_it_resumes_is_refused_not_accepted_a_second_time(
        fresh, pair_behind_haproxy):
    # haproxy re-sends a request a hung (SIGSTOP) instance does not answer within its server
    # timeout to the other instance, which takes it; the hung one, resumed, read the same
    # request from its socket and took it too: one payment, two copies, possibly forwarded to
    # both processors.
    default, fallback = fresh
    instances, balancer = pair_behind_haproxy
    answered, lock, running = [], threading.Lock(), [True]

    def client():
        while running[0]:
            cid = str(uuid.uuid4())
            try:
                status = call(balancer.port, "POST", "/payments", {"correlationId": cid, "amount": 5}, timeout=5)[0]
            except OSError:
                continue
            if status == 202:
                with lock:
                    answered.append(cid)
    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    assert wait_until(lambda: all(instance.health()["accepted"] >= 20 for instance in instances))  # both take some
    before = instances[0].health()["accepted"]
    instances[0].process.popen.send_signal(signal.SIGSTOP)
    time.sleep(2.0)  # hung for twice haproxy's "timeout server": its requests are re-sent to the other
    hung_at = len(answered)
    instances[0].process.popen.send_signal(signal.SIGCONT)
    # Resumed, it reads what it was sent while hung; the load goes on until it takes new ones too.
    assert wait_until(lambda: len(answered) > hung_at + 100 and accepted(instances[0]) > before, timeout=10)
    running[0] = False
    for thread in threads:
        thread.join()
    assert all(wait_until(lambda: drained(instance), timeout=10) for instance in instances)
    healths = [instance.health() for instance in instances]
    # A request the hung instance had taken (journaled) but not yet answered when it stopped is
    # re-sent by haproxy too: its second copy is taken by the other, before either can know.
    # At most one per client; each second copy is settled by the processor's 422, never stored.
    extra = sum(h["accepted"] for h in healths) - len(answered)
    assert len(answered) > 100 and 0 <= extra <= len(threads), healths
    assert sum(h["duplicates"] for h in healths) == extra
    assert default.summary()["totalRequests"] == len(answered)
    assert all(default.stored(cid) for cid in answered[::10])


def test_killed_under_load_the_survivor_answers_the_contest_window_exactly_every_50_ms(
        fresh, pair_behind_haproxy, make_load):
    default, fallback = fresh
    default.configure(delay=20)  # payments are in flight at the kill: it must not lose them
    (survivor, victim), balancer = pair_behind_haproxy
    assert call(balancer.port, "GET", "/internal/ready")[0] == 403  # peers only
    load = make_load(balancer.port)
    assert wait_until(lambda: all(i.health()["accepted"] >= 50 for i in (survivor, victim)))  # both under load
    victim.stop(signal.SIGKILL)
    victim.start()  # as the compose file's restart policy does
    answers = []
    polled_until = time.monotonic() + 6
    while time.monotonic() < polled_until:
        query = window_query(time.time())
        mine = survivor.summary(query)
        theirs = default.summary(query), fallback.summary(query)
        answers.append((query, mine, theirs))
        time.sleep(0.05)  # the poll's period
    outcomes = load.stop()
    assert len(answers) > 40
    for query, mine, (on_default, on_fallback) in answers:
        for name, theirs in (("default", on_default), ("fallback", on_fallback)):
            assert mine[name]["totalRequests"] == theirs["totalRequests"], (query, mine, theirs)
            assert Decimal(str(mine[name]["totalAmount"])) == Decimal(str(theirs["totalAmount"])), (query, mine)
    assert answers[-1][1]["default"]["totalRequests"] > 0
    failed = [outcome for outcome in outcomes if not (type(outcome[2]) is int and 200 <= outcome[2] < 300)]
    assert len(outcomes) > 100 and not failed, failed[:10]


def test_a_hung_instance_is_taken_out_by_the_balancer_and_payments_keep_their_answers(
        fresh, pair_behind_haproxy, make_load):
    default, fallback = fresh
    (survivor, victim), balancer = pair_behind_haproxy
    load = make_load(balancer.port, threads=32)  # many requests caught on the hung one, each retried
    assert wait_until(lambda: all(i.health()["accepted"] >= 50 for i in (survivor, victim)))  # both take some
    victim.process.popen.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    totals, taken = [], []  # the survivor's summary (both instances), and (read from, its own accepted, read until)
    while time.monotonic() < stopped + 3:  # hung for 3 s
        summary = survivor.summary()  # answers, the victim's replica standing in for it
        totals.append(summary["default"]["totalRequests"] + summary["fallback"]["totalRequests"])
        before = time.monotonic()
        taken.append((before, survivor.health()["accepted"], time.monotonic()))
        time.sleep(0.05)  # the poll's period
    victim.process.popen.send_signal(signal.SIGCONT)
    assert wait_until(lambda: accepted(victim) > 0)  # resumed
    time.sleep(1)  # the load goes on a second after it resumes: nothing may fail then either
    outcomes = load.stop()
    failed = [outcome for outcome in outcomes if not (type(outcome[2]) is int and 200 <= outcome[2] < 300)]
    assert len(outcomes) > 100 and not failed, failed[:10]
    assert any(started > stopped + 1.5 for started, _, _ in outcomes)
    assert totals == sorted(totals) and totals[-1] > totals[0], totals  # it went on confirming
    # Out of the balancer (its checks take it out within a second), the hung one got nothing:
    # every payment answered between then and its resumption was taken by the survivor.
    # A count read between `before` and `after` holds every payment accepted before `before` and
    # none accepted after `after`: the window starts after the first read and ends before the last.
    (_, first, since), (until, last, _) = next(t for t in taken if t[0] > stopped + 1.5), taken[-1]
    answered_then = sum(since <= started and started + seconds <= until for started, seconds, _ in outcomes)
    assert last - first >= answered_then > 50, (last - first, answered_then)
    assert wait_until(lambda: drained(survivor) and drained(victim))
    # ...and each answered payment was accepted once, by one of them.
    assert survivor.health()["accepted"] + victim.health()["accepted"] == len(outcomes)
    for instance in (survivor, victim):
        assert wait_until(lambda: instance.summary()["default"]["totalRequests"]
                          == default.summary()["totalRequests"])
        assert_ledger_matches(instance, default, fallback)


def replica_batch(origin, epoch, offset, total, entries, mine=0, ids=(), safe=(-(1 << 62),) * 2, base=0,
                  kept_from=-(1 << 62)):
    head = b"%s %d %d %d %d %d %d %d %d %d\n" % (origin, epoch, offset, total, mine, *safe, base, kept_from, len(ids))
    return head + array.array("q", [number for entry in entries for number in entry]).tobytes() + b"".join(ids)


def test_replica_batches_apply_each_entry_once_whatever_is_resent_lost_or_out_of_epoch(processors, make_instance):
    instance = make_instance("receiver", *processors)
    log = [(i % 2, 1_000 + i, 100 + i) for i in range(10)]

    def send(epoch, offset, total, entries, origin=b"peer"):
        status, _, body = call(instance.port, "POST", "/internal/replica",
                               replica_batch(origin, epoch, offset, total, entries))
        return status, body.split()[1:] if status == 200 else body

    def seen():
        return [instance.summary()[name]["totalRequests"] for name in ("default", "fallback")]
    assert send(0, 10, 10, []) == (200, [b"0", b"0"])  # a probe: where are you?
    assert send(0, 0, 10, log[:4]) == (200, [b"0", b"4"])
    assert send(0, 0, 10, log[:4]) == (200, [b"0", b"4"])  # its answer was lost: resent
    assert send(0, 2, 10, log[2:7]) == (200, [b"0", b"7"])  # overlapping
    assert send(0, 8, 10, log[8:]) == (200, [b"0", b"7"])  # past a gap: nothing applied
    assert send(0, 7, 10, log[7:]) == (200, [b"0", b"10"])
    assert seen() == [5, 5]
    assert instance.summary()["default"]["totalAmount"] == sum(c for p, _, c in log if p == 0) / 100
    assert send(0, 3, 3, log[:3][3:]) == (200, [b"0", b"0"])  # its log is shorter: lost, start over
    assert send(0, 0, 3, log[:3]) == (200, [b"0", b"3"])
    assert send(5, 0, 1, log[9:]) == (200, [b"5", b"1"])  # a newer epoch (a purge) replaces it
    assert send(4, 0, 10, log) == (200, [b"5", b"1"])  # an older epoch is ignored
    assert seen() == [0, 1]
    assert send(0, 0, 1, log[:1], origin=b"receiver")[0] == 400  # our own name
    assert call(instance.port, "POST", "/internal/replica", b"peer 0 0 1 0 0\n" + b"x" * 23)[0] == 400
    assert call(instance.port, "POST", "/internal/replica", b"peer 0 0 0 0\n")[0] == 400  # no `ids`
    assert send(5, 0, 1, [(2, 1, 1)])[0] == 400  # no third processor
    assert seen() == [0, 1]
    # The ids the peer accepted ride along: whole 36-byte UUIDs after the entries.
    cid = str(uuid.uuid4()).encode()
    bad = replica_batch(b"peer", 5, 1, 1, [], ids=[cid[:35] + b"!"])
    assert call(instance.port, "POST", "/internal/replica", bad)[0] == 400
    assert call(instance.port, "POST", "/internal/replica", replica_batch(b"peer", 5, 1, 1, [], ids=[cid]))[0] == 200
    assert instance.pay(cid.decode())[0] == 202  # a retry of the peer's payment: not ours to send
    assert instance.health()["duplicates"] == 1 and instance.health()["accepted"] == 0


class DroppingProxy:
    """Forwards each request to a peer and, for every `every`th batch of the log, drops the
    connection instead of passing on the answer: the peer applied the batch, the sender never
    hears of it. While `cut`, it forwards nothing and drops every connection: the peer is out
    of reach. While `cut_replica`, it drops the connections that carry a batch of the log."""

    def __init__(self, target_port, every=0):
        self.target_port, self.every, self.forwarded, self.dropped = target_port, every, 0, 0
        self.cut = self.cut_replica = False
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(client,), daemon=True).start()

    def serve(self, client):
        with client, client.makefile("rb") as reader:
            while True:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = reader.readline()
                    if not line:
                        return
                    head += line
                length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
                body = reader.read(length)
                method, path = head.split(b" ")[:2]
                if self.cut or (self.cut_replica and path == rinha.REPLICA_PATH):
                    return
                try:
                    status, _, answer = call(self.target_port, method.decode(), path.decode(), body, timeout=5)
                except OSError:
                    return
                self.forwarded += path == rinha.REPLICA_PATH
                if self.every and path == rinha.REPLICA_PATH and self.forwarded % self.every == 0:
                    self.dropped += 1
                    return
                client.sendall(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(answer), answer))

    def stop(self):
        self.server.close()


@pytest.fixture
def make_proxy():
    """make_proxy(target_port, every=0): a DroppingProxy, stopped at teardown."""
    started = []

    def make(*args, **kwargs):
        started.append(DroppingProxy(*args, **kwargs))
        return started[-1]
    yield make
    for proxy in started:
        proxy.stop()


def test_a_summary_counts_what_a_peer_confirmed_a_moment_ago_and_falls_back_on_its_replica_when_it_is_out_of_reach(
        fresh, make_proxy, make_instance):
    # Issue 16: summaries came from replicas trailing the peer by up to REPLICA_INTERVAL_S, so
    # two calls in a row through the balancer could count 3, then 2.
    default, fallback = fresh
    ports = [free_port(), free_port()]
    proxies = [make_proxy(port) for port in ports]  # proxies[i] stands in front of instance i
    instances = [make_instance(f"api{i + 1}", default, fallback, port=port,
                               PEERS=f"http://127.0.0.1:{proxies[1 - i].port}") for i, port in enumerate(ports)]
    for proxy in proxies:
        proxy.cut_replica = True  # no batch of either log gets through
    assert len(pay_many(instances[0], 3, threads=3)) == 3
    assert wait_until(lambda: drained(instances[0]))
    assert instances[1].summary()["default"]["totalRequests"] == 3  # asked api1: fresh
    assert_ledger_matches(instances[1], default, fallback)
    proxies[0].cut = True  # api2 cannot ask api1, and holds no replica of it yet
    assert instances[1].summary()["default"]["totalRequests"] == 0
    proxies[1].cut_replica = False  # api1's log reaches api2: the replica answers for api1
    assert wait_until(lambda: instances[1].summary()["default"]["totalRequests"] == 3)
    assert_ledger_matches(instances[1], default, fallback)


def test_under_load_summaries_polled_through_the_balancer_never_go_back_and_match_the_processors(
        fresh, tmp_path, make_peers, make_balancer, make_load):
    # Issue 16: the acceptance test: every 10 ms, the whole history (it may only grow) and
    # the contest's window (equal to the processors' records for it), through haproxy, while
    # payments flow through it; the default answers in 1 s, which keeps the promise.
    default, fallback = fresh
    default.configure(delay=1000)
    instances = make_peers(default, fallback, sockets=True)  # in-process: nothing kills them
    balancer = make_balancer(tmp_path)
    load = make_load(balancer.port, threads=20, pause=0.05)  # about 300 payments a second
    previous, polls, errors = -1, 0, []
    end = time.monotonic() + 8
    while time.monotonic() < end:
        status, _, body = call(balancer.port, "GET", "/payments-summary")
        assert status == 200, body
        whole = json.loads(body)["default"]["totalRequests"] + json.loads(body)["fallback"]["totalRequests"]
        if whole < previous:
            errors.append(f"poll {polls}: {whole} after {previous}")
        previous = max(previous, whole)
        query = window_query(time.time())
        status, _, body = call(balancer.port, "GET", "/payments-summary" + query)
        assert status == 200, body
        ours = json.loads(body)
        theirs = {"default": default.summary(query), "fallback": fallback.summary(query)}
        for name in ("default", "fallback"):
            if ours[name]["totalRequests"] != theirs[name]["totalRequests"]:
                errors.append(f"poll {polls} {query}: {name} {ours[name]} against {theirs[name]}")
        polls += 1
        time.sleep(0.01)  # the poll's period
    outcomes = load.stop()
    assert not errors, f"{len(errors)} of {polls} polls: {errors[:5]}"
    assert polls > 100 and previous > 200
    assert all(status == 202 for _, _, status in outcomes)
    assert wait_until(lambda: all(drained(instance) for instance in instances))
    assert_ledger_matches(instances[0], default, fallback)


def test_an_idle_instance_only_sends_its_peer_a_heartbeat_yet_new_confirmations_and_a_restarted_peer_wait_for_none(
        fresh, make_proxy, make_instance):
    default, fallback = fresh
    receiver_port = free_port()
    proxy = make_proxy(receiver_port, every=0)
    heartbeat = 4.0  # longer than any wait below: nothing here may wait for a heartbeat
    sender = make_instance("sender", default, fallback, PEERS=f"http://127.0.0.1:{proxy.port}",
                           REPLICA_HEARTBEAT_S=heartbeat)
    receiver = make_instance("receiver", default, fallback, port=receiver_port,  # its summary: the replica
                             process=True,  # killed
                             PEERS=f"http://127.0.0.1:{sender.port}", REPLICA_HEARTBEAT_S=heartbeat,
                             PEER_SUMMARY_TIMEOUT_S=0)
    assert len(pay_many(sender, 5, threads=1)) == 5
    assert wait_until(lambda: drained(sender))
    assert wait_until(lambda: receiver.summary()["default"]["totalRequests"] == 5)
    before = proxy.forwarded
    time.sleep(2.0)  # lets eight REPLICA_INTERVAL_S pass with nothing new: at most one exchange may go
    # Nothing new: one exchange per REPLICA_HEARTBEAT_S, not one per REPLICA_INTERVAL_S.
    assert proxy.forwarded - before <= 1
    assert len(pay_many(sender, 1, threads=1)) == 1  # idle, then a confirmation: sent at a tick
    assert wait_until(lambda: receiver.summary()["default"]["totalRequests"] == 6, timeout=1.0)
    receiver.stop(signal.SIGKILL)  # its replica was in memory only
    receiver.start()  # its first batch says it holds none of ours: we send at once
    assert wait_until(lambda: receiver.summary()["default"]["totalRequests"] == 6, timeout=2.0)


def test_lost_batch_answers_and_a_receiver_restarted_mid_stream_never_count_twice(fresh, make_proxy, make_instance):
    default, fallback = fresh
    default.configure(delay=5)
    receiver_port = free_port()
    proxy = make_proxy(receiver_port, every=2)
    sender = make_instance("sender", default, fallback, PEERS=f"http://127.0.0.1:{proxy.port}",
                           REPLICA_BATCH=7)  # many small batches, so many answers are lost
    receiver = make_instance("receiver", default, fallback, port=receiver_port,  # its summary: the replica
                             process=True,  # killed
                             PEERS=f"http://127.0.0.1:{sender.port}", PEER_SUMMARY_TIMEOUT_S=0)
    outcome = []
    paying = threading.Thread(target=lambda: outcome.extend(send_payments(sender, 400, 4)))
    paying.start()
    assert wait_until(lambda: proxy.forwarded >= 5)  # mid-stream
    receiver.stop(signal.SIGKILL)  # it loses its replica mid-stream
    receiver.start()
    paying.join()
    accepted, failed = outcome
    assert not failed, failed[:10]
    assert wait_until(lambda: drained(sender))
    assert wait_until(lambda: receiver.summary()["default"]["totalRequests"] == len(accepted))
    time.sleep(0.5)  # lets more exchanges, and more lost answers, happen: no change may follow
    assert proxy.dropped > 10
    for instance in (sender, receiver):
        mine = assert_ledger_matches(instance, default, fallback)
        assert mine["default"]["totalRequests"] == len(accepted) > 300


def test_the_ledgers_log_keeps_its_order_and_epoch_across_a_purge_a_crash_and_restarts(tmp_path):
    # Peers hold this log by index: after any restart, entry i must be the same payment.
    path = str(tmp_path / "j")
    journal, ledger = rinha.Journal(path, CONFIG), ledger_at(tmp_path)
    journal.open_compacted(ledger, {})
    confirmed = [(int(i % 3 == 0), 1000 + i * 7 % 13, 100 + i) for i in range(30)]  # interleaved, unsorted

    def confirm(seq, entry):  # as Pipeline.settle does: the journal first, then the ledger
        journal.append(rinha.record(b"C", seq, *entry, ledger.count()))
        ledger.record(*entry)
    for seq, entry in enumerate(confirmed[:10]):
        confirm(seq, entry)
    ledger.clear(77)  # a purge starts epoch 77: what came before is gone
    journal.append(rinha.record(b"P", 77))
    for seq, entry in enumerate(confirmed[10:20], 10):
        confirm(seq, entry)
    ledger.flush()
    for seq, entry in enumerate(confirmed[20:], 20):
        confirm(seq, entry)  # never flushed: the crash loses them from the ledger, not the journal
    ledger.close()
    for _ in range(3):  # a restart, and another: replay, then compaction
        again = ledger_at(tmp_path)
        pending, _ = rinha.Journal(path, CONFIG).replay(again, rinha.RecentIds(CONFIG.remembered_ids))
        assert again.read(0, again.count()) == b"".join(rinha.LOG_ENTRY.pack(*entry) for entry in confirmed[10:])
        assert again.epoch == 77
        rinha.Journal(path, CONFIG).open_compacted(again, pending)
        again.close()


def test_a_sender_restarted_while_its_peer_lags_resumes_where_the_peer_is(fresh, make_proxy, make_instance):
    default, fallback = fresh
    receiver_port = free_port()
    proxy = make_proxy(receiver_port)
    sender = make_instance("sender", default, fallback, PEERS=f"http://127.0.0.1:{proxy.port}",
                           process=True, FALLBACK_AFTER_S=0)  # killed
    receiver = make_instance("receiver", default, fallback, port=receiver_port)  # no peer: its replica answers
    pay_many(sender, 30, threads=3)  # to the default
    default.configure(failure=True)
    pay_many(sender, 30, threads=3)  # to the fallback
    assert wait_until(lambda: drained(sender))
    assert wait_until(lambda: receiver.summary() == sender.summary())
    default.configure(failure=False)
    proxy.cut = True  # the receiver lags from here
    assert wait_until(lambda: sender.pay()[0] == 202 and sender.health()["default"]["breaker"] == "closed")
    pay_many(sender, 30, threads=3)  # to the default again: the log is D.., F.., D..
    assert wait_until(lambda: drained(sender))
    for _ in range(2):  # its journal is compacted at one start and replayed at the next
        sender.stop(signal.SIGKILL)
        sender.start()
    proxy.cut = False
    assert sender.summary()["fallback"]["totalRequests"] > 0
    assert wait_until(lambda: receiver.summary() == sender.summary())
    for instance in (sender, receiver):
        assert_ledger_matches(instance, default, fallback)


def test_a_restarted_instance_answers_from_the_replica_it_kept_on_disk_while_its_peer_is_down(pair):
    # Issue 17: replicas were in memory only, so a restart with its peer down counted nothing of it.
    first, second = pair
    accepted = pay_many(first, 60, threads=3)
    assert wait_until(lambda: drained(first))
    assert wait_until(lambda: second.health()["replicas"].get("api1") == 60)
    second.stop()
    first.stop()
    second.start()  # its peer is down: what it counts of api1 comes from its own files
    assert second.health()["replicas"] == {"api1": 60}
    assert second.summary()["default"]["totalRequests"] == len(accepted) == 60
    assert second.summary("?from=2000-01-01T00:00:00Z&to=2100-01-01T00:00:00Z")["default"]["totalRequests"] == 60


def test_a_graceful_stop_streams_what_its_peers_lack_before_it_exits(fresh, make_proxy, make_instance):
    default, fallback = fresh
    receiver_port = free_port()
    proxy = make_proxy(receiver_port)
    proxy.cut = True  # the sender's batches fail: its stream then sleeps REPLICA_INTERVAL_S
    quiet = {"REPLICA_INTERVAL_S": 60, "REPLICA_HEARTBEAT_S": 60}  # no batch but the last
    sender = make_instance("sender", default, fallback, PEERS=f"http://127.0.0.1:{proxy.port}", **quiet)
    receiver = make_instance("receiver", default, fallback, port=receiver_port,  # its summary: the replica
                             PEERS=f"http://127.0.0.1:{sender.port}", PEER_SUMMARY_TIMEOUT_S=0, **quiet)
    accepted = pay_many(sender, 20, threads=2)
    assert wait_until(lambda: drained(sender))
    assert receiver.summary()["default"]["totalRequests"] == 0
    proxy.cut = False
    assert sender.stop() == 0
    assert receiver.summary()["default"]["totalRequests"] == len(accepted) == 20
    assert_ledger_matches(receiver, default, fallback)


def test_purge_needs_the_token_and_empties_every_instance(fresh, make_peers):
    default, fallback = fresh
    instances = make_peers(default, fallback, process=True, PURGE_TOKEN="secret")  # killed
    port = instances[0].port
    for instance in instances:
        pay_many(instance, 10, threads=2)
    assert all(wait_until(lambda: drained(instance)) for instance in instances)
    assert call(port, "POST", "/purge-payments", b"")[0] == 403
    assert call(port, "POST", "/purge-payments", b"", {"X-Rinha-Token": "wrong"})[0] == 403
    assert wait_until(lambda: instances[1].summary()["default"]["totalRequests"] == 20)
    assert call(port, "POST", "/purge-payments", b"", {"X-Rinha-Token": "secret"})[0] == 200
    assert [instance.summary()["default"]["totalRequests"] for instance in instances] == [0, 0]
    pay_many(instances[0], 5, threads=1)  # the replicas start again from the purge's epoch
    assert wait_until(lambda: all(instance.summary()["default"]["totalRequests"] == 5 for instance in instances))
    for instance in instances:
        instance.stop(signal.SIGKILL)
        instance.start()  # the purge and its epoch are journaled too
    assert wait_until(lambda: all(instance.summary()["default"]["totalRequests"] == 5 for instance in instances))
    time.sleep(0.3)  # lets the replicas exchange again: the count must stay, not double
    assert [instance.summary()["default"]["totalRequests"] for instance in instances] == [5, 5]


def test_purge_is_disabled_without_a_configured_token(front):
    status, _, body = call(front.port, "POST", "/purge-payments", b"", {"X-Rinha-Token": ""})
    assert status == 403 and b"disabled" in body


def test_metrics_are_prometheus_text_that_counts_payments_latency_breakers_and_the_loop(instance):
    from prometheus_client.parser import text_string_to_metric_families
    assert len(pay_many(instance, 30, threads=3)) == 30
    assert wait_until(lambda: drained(instance))
    assert wait_until(lambda: instance.health()["loop_lag_ms"] > 0)  # a whole second of lag measured
    status, headers, body = call(instance.port, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body.decode()) for s in family.samples}
    assert samples["rinha_payments_accepted_total", ()] == 30
    assert samples["rinha_payments_confirmed_total", (("processor", "default"),)] == 30
    assert samples["rinha_payments_confirmed_total", (("processor", "fallback"),)] == 0
    assert samples["rinha_post_payments_seconds_count", ()] == 30
    assert samples["rinha_post_payments_seconds_bucket", (("le", "+Inf"),)] == 30
    assert samples["rinha_breaker_state", (("processor", "default"), ("state", "closed"))] == 1
    assert samples["rinha_queue_depth", ()] == 0
    assert samples["rinha_journal_bytes", ()] == instance.health()["journal_bytes"] > 0
    assert samples["rinha_event_loop_lag_seconds", ()] > 0  # measured: a loop is never on time to the µs
    assert "loop_lag_ms" in instance.health()


def test_health_reports_live_statistics(fresh, instance):
    default, fallback = fresh
    accepted = pay_many(instance, 10, threads=2)
    assert wait_until(lambda: drained(instance))
    assert instance.pay(accepted[0])[0] == 202  # a duplicate
    assert wait_until(lambda: instance.health()["duplicates"] == 1)
    health = instance.health()
    assert (health["queue"], health["in_flight"], health["pinned"]) == (0, 0, 0)
    assert (health["accepted"], health["duplicates"], health["instance"]) == (10, 1, "api1")
    assert health["journal_bytes"] == os.path.getsize(instance.journal) > 0
    assert health["uptime_s"] >= 0 and health["connections"] >= 1  # this request's connection
    assert set(health["gc"]) == {"collections", "total_ms", "longest_ms"}
    theirs = default.summary()
    assert health["default"]["confirmed"] == health["default"]["ledger_requests"] == theirs["totalRequests"] == 10
    assert Decimal(str(health["default"]["ledger_amount"])) == Decimal(str(theirs["totalAmount"]))
    assert (health["default"]["failed_attempts"], health["default"]["breaker"]) == (0, rinha.CLOSED)
    assert health["default"]["latency_ms"] > 0 and health["default"]["keeps_promise"]
    assert (health["fallback"]["confirmed"], health["fallback"]["ledger_requests"]) == (0, 0)
    default.configure(failure=True)  # now failures: counted, and the breaker opens
    assert instance.pay()[0] == 202
    assert wait_until(lambda: instance.health()["default"]["failed_attempts"] >= CONFIG.breaker_failures)
    health = instance.health()
    assert health["default"]["breaker"] != rinha.CLOSED and health["queue"] + health["in_flight"] == 1
    assert health["accepted"] == 11 and health["default"]["confirmed"] == 10
