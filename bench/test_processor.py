"""Tests of bench/processor.py, the payment processor emulator (CONTRACT.md section 3).

Each test starts or reuses a real emulator subprocess on a free 127.0.0.1 port and
talks to it over real sockets; nothing is mocked.
"""

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from decimal import Decimal

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "processor.py")
TOKEN = "123"
WHEN = "2025-07-15T12:34:56.000Z"


# ---------------------------------------------------------------------------
# Emulator process
# ---------------------------------------------------------------------------

class Emulator:
    """bench/processor.py as a subprocess; `address` is (host, port) or a unix path."""

    def __init__(self, *args, timeout=15.0):
        self.log = tempfile.TemporaryFile()
        extra = list(args)
        if "--unix" not in extra and "--port" not in extra:
            extra += ["--port", "0"]
        self.proc = subprocess.Popen([sys.executable, SCRIPT, *extra],
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(rb"processor listening on (\S+)", self.output())
            if found:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                output = self.output().decode(errors="replace")
                self.stop()
                raise RuntimeError("emulator did not start: " + output)
            time.sleep(0.02)
        where = found.group(1).decode().rstrip(",")
        if where.startswith("unix:"):
            self.address = where[5:]
        else:
            host, _, port = where.rpartition(":")
            self.address = (host, int(port))

    def output(self):
        """What the emulator wrote to stderr so far. It shares the file's offset with the
        emulator (stderr writes the text and its newline apart), so this reads with pread:
        a seek here could let the newline overwrite the line's first byte."""
        return os.pread(self.log.fileno(), 1 << 20, 0)

    def stop(self, signum=signal.SIGTERM):
        """Signal the process (by PID) and return its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


# ---------------------------------------------------------------------------
# A tiny raw HTTP/1.1 client (keep-alive, pipelining, split writes)
# ---------------------------------------------------------------------------

def build(method, path, body=b"", headers=None, version="HTTP/1.1"):
    if isinstance(body, str):
        body = body.encode()
    lines = [f"{method} {path} {version}", "Host: processor"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body, parse_float=Decimal)

    def __repr__(self):
        return f"<{self.status} {self.body[:200]!r}>"


class Client:
    def __init__(self, address, timeout=15.0):
        if isinstance(address, str):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(address)
        else:
            self.sock = socket.create_connection(address)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(timeout)
        self.buf = b""

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data: bytes):
        self.sock.sendall(data)

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed by the emulator")
        self.buf += chunk

    def read(self) -> Response:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        return Response(status, headers, body)

    def request(self, method, path, body=b"", headers=None) -> Response:
        self.send(build(method, path, body, headers))
        return self.read()

    def closed_by_peer(self) -> bool:
        try:
            return self.buf == b"" and self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


def call(emu, method, path, body=b"", headers=None) -> Response:
    with Client(emu.address) as client:
        return client.request(method, path, body, headers)


def admin(emu, method, path, doc=None, token=TOKEN) -> Response:
    body = json.dumps(doc) if doc is not None else b""
    headers = {"X-Rinha-Token": token} if token is not None else {}
    return call(emu, method, path, body, headers)


def payment_body(cid, amount="19.90", requested_at=WHEN) -> bytes:
    # amount is inserted as raw JSON text, so decimals reach the emulator exactly
    return ('{"correlationId": "%s", "amount": %s, "requestedAt": "%s"}'
            % (cid, amount, requested_at)).encode()


def pay(emu, cid=None, amount="19.90", requested_at=WHEN) -> Response:
    return call(emu, "POST", "/payments", payment_body(cid or uuid.uuid4(), amount, requested_at))


def summary(emu, query="") -> Response:
    return admin(emu, "GET", "/admin/payments-summary" + query)


def count(emu, query="") -> int:
    return summary(emu, query).json()["totalRequests"]


def iso(ms: int) -> str:
    """Milliseconds since the epoch -> JavaScript toISOString() form."""
    seconds, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + ".%03dZ" % millis


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_emulator():
    emu = Emulator("--fee", "0.05", "--health-window-s", "1")
    yield emu
    assert emu.stop() == 0


@pytest.fixture
def emu(shared_emulator):
    """The shared emulator with no payments, no delay, no failure and token 123."""
    assert admin(shared_emulator, "PUT", "/admin/configurations/delay", {"delay": 0}).status == 200
    assert admin(shared_emulator, "PUT", "/admin/configurations/failure",
                 {"failure": False}).status == 200
    assert admin(shared_emulator, "PUT", "/admin/configurations/chaos", {}).status == 200
    assert admin(shared_emulator, "POST", "/admin/purge-payments").status == 200
    return shared_emulator


@pytest.fixture
def fresh():
    """Starts private emulators (own health window, own options); stops them at the end."""
    started = []

    def start(*args):
        emu = Emulator(*args)
        started.append(emu)
        return emu

    yield start
    for emu in started:
        assert emu.stop() == 0


def test_reading_the_emulators_output_leaves_the_offset_it_writes_at(fresh):
    """The emulator writes its listening line and the newline apart; a reader that seeks
    between them made the newline overwrite the "p" (a CI run waited 15 s for it)."""
    emu = fresh()
    end = os.lseek(emu.log.fileno(), 0, os.SEEK_END)
    os.lseek(emu.log.fileno(), end - 1, os.SEEK_SET)   # as if between the text and its newline
    assert emu.output().startswith(b"processor listening on ")
    assert os.lseek(emu.log.fileno(), 0, os.SEEK_CUR) == end - 1


# ---------------------------------------------------------------------------
# POST /payments and GET /payments/{id}
# ---------------------------------------------------------------------------

def test_post_payment_answers_200_message_and_stores_it(emu):
    cid = str(uuid.uuid4())
    response = pay(emu, cid, "19.90")
    assert response.status == 200
    assert response.json() == {"message": "payment processed successfully"}
    stored = call(emu, "GET", f"/payments/{cid}")
    assert stored.status == 200
    assert stored.json() == {"correlationId": cid, "amount": Decimal("19.90"), "requestedAt": WHEN}
    assert b'"amount":19.90' in stored.body


@pytest.mark.parametrize("sent, kept", [
    ("0.125", "0.12"), ("0.135", "0.14"), ("2.675", "2.68"), ("1.005", "1.00"),
    ("0.0050", "0.00"), ("0.0150", "0.02"), ("19.9", "19.90"), ("19", "19.00"),
    ("1e2", "100.00"), ("123456789012345678.905", "123456789012345678.90"),
])
def test_amount_is_stored_rounded_half_to_even_as_a_decimal(emu, sent, kept):
    cid = str(uuid.uuid4())
    assert pay(emu, cid, sent).status == 200
    stored = call(emu, "GET", f"/payments/{cid}")
    assert f'"amount":{kept},'.encode() in stored.body
    assert f'"totalAmount":{kept},'.encode() in summary(emu).body


def test_get_payment_unknown_id_is_404_and_malformed_id_is_400(emu):
    assert call(emu, "GET", f"/payments/{uuid.uuid4()}").status == 404
    assert call(emu, "GET", "/payments/not-a-uuid").status == 400


def test_duplicate_correlation_id_gets_422_and_is_stored_once(emu):
    cid = str(uuid.uuid4())
    assert pay(emu, cid, "10.00").status == 200
    second = pay(emu, cid, "99.00")
    assert second.status == 422
    assert call(emu, "GET", f"/payments/{cid}").json()["amount"] == Decimal("10.00")
    assert summary(emu).json()["totalRequests"] == 1
    # the same UUID in upper case is the same payment
    assert pay(emu, cid.upper(), "1.00").status == 422


async def _concurrent_posts(address, bodies):
    """POSTs them all at once; returns (status, sent, answered) for each, monotonic seconds."""
    async def one(body):
        reader, writer = await asyncio.open_connection(*address)
        sent = time.monotonic()
        writer.write(build("POST", "/payments", body))
        status = int((await reader.readline()).split()[1])
        answered = time.monotonic()
        writer.close()
        return status, sent, answered
    return await asyncio.gather(*(one(body) for body in bodies))


def test_concurrent_duplicates_store_once_one_200_and_the_rest_422(emu):
    assert admin(emu, "PUT", "/admin/configurations/delay", {"delay": 200}).json()["is"] == 200
    cid = str(uuid.uuid4())
    results = asyncio.run(_concurrent_posts(emu.address, [payment_body(cid)] * 5))
    statuses = [status for status, _, _ in results]
    # They overlapped in the delay: all five were sent before the first answer came.
    assert max(sent for _, sent, _ in results) < min(answered for _, _, answered in results)
    assert sorted(statuses) == [200, 422, 422, 422, 422]
    assert count(emu) == 1


@pytest.mark.parametrize("body", [
    b"", b"not json", b"[]", b'"text"',
    b'{"amount": 1.0, "requestedAt": "2025-07-15T12:34:56.000Z"}',
    b'{"correlationId": "abc", "amount": 1.0, "requestedAt": "2025-07-15T12:34:56.000Z"}',
    b'{"correlationId": 5, "amount": 1.0, "requestedAt": "2025-07-15T12:34:56.000Z"}',
    b'{"correlationId": "%s", "requestedAt": "2025-07-15T12:34:56.000Z"}' % str(uuid.uuid4()).encode(),
    b'{"correlationId": "%s", "amount": "19.90", "requestedAt": "2025-07-15T12:34:56.000Z"}'
    % str(uuid.uuid4()).encode(),
    b'{"correlationId": "%s", "amount": true, "requestedAt": "2025-07-15T12:34:56.000Z"}'
    % str(uuid.uuid4()).encode(),
    b'{"correlationId": "%s", "amount": null, "requestedAt": "2025-07-15T12:34:56.000Z"}'
    % str(uuid.uuid4()).encode(),
    b'{"correlationId": "%s", "amount": NaN, "requestedAt": "2025-07-15T12:34:56.000Z"}'
    % str(uuid.uuid4()).encode(),
    b'{"correlationId": "%s", "amount": 1e999999, "requestedAt": "2025-07-15T12:34:56.000Z"}'
    % str(uuid.uuid4()).encode(),
    b'{"correlationId": "%s", "amount": 1.0}' % str(uuid.uuid4()).encode(),
    b'{"correlationId": "%s", "amount": 1.0, "requestedAt": "yesterday"}' % str(uuid.uuid4()).encode(),
])
def test_invalid_payment_payload_gets_400_and_stores_nothing(emu, body):
    response = call(emu, "POST", "/payments", body)
    assert response.status == 400
    assert count(emu) == 0


# ---------------------------------------------------------------------------
# Delay and failure
# ---------------------------------------------------------------------------

def test_delay_config_answers_was_and_is_and_slows_payments(emu):
    first = admin(emu, "PUT", "/admin/configurations/delay", {"delay": 250})
    assert first.status == 200
    assert first.json() == {"config": "delay", "was": 0, "is": 250}
    started = time.monotonic()
    assert pay(emu).status == 200
    assert time.monotonic() - started >= 0.25
    again = admin(emu, "PUT", "/admin/configurations/delay", {"delay": 0})
    assert again.json() == {"config": "delay", "was": 250, "is": 0}
    assert admin(emu, "PUT", "/admin/configurations/delay", {"delay": "x"}).status == 400


def test_failure_answers_500_after_the_delay_and_stores_nothing(emu):
    assert admin(emu, "PUT", "/admin/configurations/delay", {"delay": 300}).status == 200
    switched = admin(emu, "PUT", "/admin/configurations/failure", {"failure": True})
    assert switched.status == 200
    assert switched.json() == {"config": "failure", "was": False, "is": True}
    cid = str(uuid.uuid4())
    started = time.monotonic()
    assert pay(emu, cid).status == 500
    assert time.monotonic() - started >= 0.3          # failing answers are slow too
    assert call(emu, "GET", f"/payments/{cid}").status == 404
    assert count(emu) == 0
    assert admin(emu, "PUT", "/admin/configurations/failure", {"failure": False}).json()["was"] is True
    assert admin(emu, "PUT", "/admin/configurations/failure", {"failure": "no"}).status == 400
    assert pay(emu, cid).status == 200                # the failed attempt left no trace
    assert count(emu) == 1


def test_base_latency_slows_every_payment_insert(fresh):
    emu = fresh("--base-latency-ms", "150")
    started = time.monotonic()
    assert pay(emu).status == 200
    assert time.monotonic() - started >= 0.15


# ---------------------------------------------------------------------------
# Concurrency limit: 800 in flight + 500 waiting, the rest 429
# ---------------------------------------------------------------------------

async def _flood(address, total):
    connections = []
    for start in range(0, total, 100):              # connect in batches (accept backlog)
        connections += await asyncio.gather(
            *(asyncio.open_connection(*address) for _ in range(start, min(total, start + 100))))

    async def one(reader, writer):
        sent = time.monotonic()
        writer.write(build("POST", "/payments", payment_body(uuid.uuid4())))
        status = int((await reader.readline()).split()[1])
        elapsed = time.monotonic() - sent
        writer.close()
        return status, elapsed

    return await asyncio.wait_for(asyncio.gather(*(one(r, w) for r, w in connections)), 20)


def test_beyond_800_in_flight_and_500_waiting_payments_get_429(emu):
    assert admin(emu, "PUT", "/admin/configurations/delay", {"delay": 1000}).status == 200
    results = asyncio.run(_flood(emu.address, 1400))
    rejected = [elapsed for status, elapsed in results if status == 429]
    served = sorted(elapsed for status, elapsed in results if status == 200)
    assert len(rejected) == 100 and len(served) == 1300
    assert max(rejected) < served[0]                  # refused at once, before any delay ended
    # Two waves a delay apart: the 800 that ran right away, then the 500 that waited for a slot.
    gaps = [later - earlier for earlier, later in zip(served, served[1:])]
    assert gaps.index(max(gaps)) == 799 and max(gaps) >= 0.5
    assert served[0] >= 0.95 and served[800] >= 1.8
    assert count(emu) == 1300


# ---------------------------------------------------------------------------
# GET /payments/service-health
# ---------------------------------------------------------------------------

async def _timed_gets(address, path, n):
    async def one():
        reader, writer = await asyncio.open_connection(*address)
        sent = time.monotonic()
        writer.write(build("GET", path))
        status = int((await reader.readline()).split()[1])
        elapsed = time.monotonic() - sent
        writer.close()
        return status, elapsed
    return await asyncio.gather(*(one() for _ in range(n)))


def test_health_answers_failing_and_min_response_time(fresh):
    emu = fresh("--health-window-s", "1")
    admin(emu, "PUT", "/admin/configurations/delay", {"delay": 123})
    admin(emu, "PUT", "/admin/configurations/failure", {"failure": True})
    response = call(emu, "GET", "/payments/service-health")
    assert response.status == 200
    assert response.json() == {"failing": True, "minResponseTime": 123}


def test_health_allows_one_call_per_window_queues_two_and_refuses_the_rest(fresh):
    emu = fresh("--health-window-s", "1")
    first = time.monotonic()
    assert call(emu, "GET", "/payments/service-health").status == 200
    at_once = time.monotonic() - first
    # the next call waits for the next window; its answer marks a window start
    for _ in range(3):
        started = time.monotonic()
        assert call(emu, "GET", "/payments/service-health").status == 200
        waited = time.monotonic() - started
        if waited > 0.05:
            break
    assert waited > 0.05 and at_once < waited         # the first call was answered without that wait
    # right after a window start whose call is used: 2 wait, the others get 429
    results = asyncio.run(_timed_gets(emu.address, "/payments/service-health", 4))
    refused = [elapsed for status, elapsed in results if status == 429]
    answered = sorted(elapsed for status, elapsed in results if status == 200)
    assert len(refused) == 2 and max(refused) < min(answered)  # refused at once, before any window
    assert len(answered) == 2
    assert answered[0] >= 0.8                         # the next window
    assert answered[1] >= 1.8 and answered[1] - answered[0] >= 0.8  # the window after (1 call per window)
    response = call(emu, "GET", "/payments/service-health")
    assert response.status in (200, 429)              # whatever the window, it is answered


# ---------------------------------------------------------------------------
# GET /admin/payments-summary
# ---------------------------------------------------------------------------

def test_summary_window_is_inclusive_on_both_bounds(emu):
    base = 1752582896000                              # 2025-07-15T12:34:56.000Z
    for offset in (0, 1000, 2000, 3000):
        assert pay(emu, amount="1.00", requested_at=iso(base + offset)).status == 200
    window = f"?from={iso(base + 1000)}&to={iso(base + 2000)}"
    assert count(emu, window) == 2                    # exactly at from and exactly at to
    assert count(emu, f"?from={iso(base + 1001)}&to={iso(base + 2000)}") == 1
    assert count(emu, f"?from={iso(base + 1000)}&to={iso(base + 1999)}") == 1
    assert count(emu, f"?from={iso(base + 3001)}&to={iso(base + 9000)}") == 0
    assert count(emu, f"?from={iso(base)}&to={iso(base + 3000)}") == 4
    # other spellings of the same instants
    assert count(emu, "?from=2025-07-15T12%3A34%3A57Z&to=2025-07-15T12:34:58.000%2B00:00") == 2
    assert count(emu, "?from=2025-07-15T09:34:57.000-03:00&to=2025-07-15T12:34:58.0000000Z") == 2


def test_summary_without_from_or_to_counts_everything(emu):
    for second in (10, 20, 30):
        pay(emu, requested_at=f"2025-07-15T12:00:{second}.000Z")
    assert count(emu) == 3
    assert count(emu, "?from=2025-07-15T12:00:25.000Z") == 3
    assert count(emu, "?to=2025-07-15T12:00:15.000Z") == 3
    assert count(emu, "?from=&to=") == 3
    assert summary(emu, "?from=garbage&to=2025-07-15T12:00:15.000Z").status == 400


def test_summary_totals_are_exact_decimals_and_fee_is_rounded_half_to_even(emu):
    for amount in ("0.10", "0.20", "0.20"):           # 0.50 exactly, not 0.5000000001
        assert pay(emu, amount=amount).status == 200
    response = summary(emu)
    assert response.status == 200
    assert response.body == (b'{"totalRequests":3,"totalAmount":0.50,'
                             b'"totalFee":0.02,"feePerTransaction":0.05}')  # 0.025 -> 0.02
    admin(emu, "POST", "/admin/purge-payments")
    assert summary(emu).body == (b'{"totalRequests":0,"totalAmount":0.00,'
                                 b'"totalFee":0.00,"feePerTransaction":0.05}')
    for _ in range(1000):
        pay(emu, amount="19.90")
    assert summary(emu).json() == {"totalRequests": 1000, "totalAmount": Decimal("19900.00"),
                                   "totalFee": Decimal("995.00"),
                                   "feePerTransaction": Decimal("0.05")}


def test_fee_per_transaction_comes_from_the_fee_option(fresh):
    emu = fresh("--fee", "0.15")
    pay(emu, amount="19.90")
    assert summary(emu).json() == {"totalRequests": 1, "totalAmount": Decimal("19.90"),
                                   "totalFee": Decimal("2.98"),   # 2.985 -> 2.98
                                   "feePerTransaction": Decimal("0.15")}


# ---------------------------------------------------------------------------
# Admin: token, purge
# ---------------------------------------------------------------------------

ADMIN_CALLS = [
    ("GET", "/admin/payments-summary", None),
    ("PUT", "/admin/configurations/token", {"token": "abc"}),
    ("PUT", "/admin/configurations/delay", {"delay": 5}),
    ("PUT", "/admin/configurations/failure", {"failure": True}),
    ("POST", "/admin/purge-payments", None),
]


@pytest.mark.parametrize("method, path, doc", ADMIN_CALLS)
def test_admin_endpoint_without_or_with_wrong_token_gets_401_and_changes_nothing(
        emu, method, path, doc):
    pay(emu)
    assert admin(emu, method, path, doc, token=None).status == 401
    assert admin(emu, method, path, doc, token="wrong").status == 401
    assert count(emu) == 1
    assert admin(emu, "PUT", "/admin/configurations/delay", {"delay": 0}).json()["was"] == 0
    assert admin(emu, "PUT", "/admin/configurations/failure", {"failure": False}).json()["was"] is False


def test_token_change_answers_204_and_only_the_new_token_works(emu):
    changed = admin(emu, "PUT", "/admin/configurations/token", {"token": "s3cret"})
    try:
        assert changed.status == 204 and changed.body == b""
        assert summary(emu).status == 401
        assert admin(emu, "GET", "/admin/payments-summary", token="s3cret").status == 200
    finally:
        restored = admin(emu, "PUT", "/admin/configurations/token", {"token": TOKEN}, token="s3cret")
        assert restored.status == 204
    assert summary(emu).status == 200


def test_token_option_sets_the_initial_token(fresh):
    emu = fresh("--token", "xyz")
    assert summary(emu).status == 401
    assert admin(emu, "GET", "/admin/payments-summary", token="xyz").status == 200


def test_purge_answers_200_message_and_removes_all_payments(emu):
    cid = str(uuid.uuid4())
    pay(emu, cid)
    pay(emu)
    purged = admin(emu, "POST", "/admin/purge-payments")
    assert purged.status == 200
    assert purged.json() == {"message": "All payments purged."}
    assert count(emu) == 0
    assert call(emu, "GET", f"/payments/{cid}").status == 404
    assert pay(emu, cid).status == 200                # the id is free again


# ---------------------------------------------------------------------------
# HTTP: routing, keep-alive, split reads, pipelining, Connection: close
# ---------------------------------------------------------------------------

def test_unknown_path_is_404_and_wrong_method_is_405(emu):
    assert call(emu, "GET", "/nope").status == 404
    assert call(emu, "GET", "/").status == 404
    assert call(emu, "GET", "/payments").status == 405
    assert admin(emu, "POST", "/admin/payments-summary").status == 405


def test_keep_alive_serves_many_requests_on_one_connection(emu):
    with Client(emu.address) as client:
        for _ in range(50):
            assert client.request("POST", "/payments", payment_body(uuid.uuid4())).status == 200
        answer = client.request("GET", "/admin/payments-summary", headers={"X-Rinha-Token": TOKEN})
        assert answer.json()["totalRequests"] == 50
        assert "connection" not in answer.headers


def test_request_split_across_many_reads_is_reassembled(emu):
    cid = str(uuid.uuid4())
    data = build("POST", "/payments", payment_body(cid, "7.77"))
    with Client(emu.address) as client:
        for i in range(len(data)):                    # one byte per segment
            client.send(data[i:i + 1])
            time.sleep(0.001)
        assert client.read().status == 200
        request = build("GET", f"/payments/{cid}")
        client.send(request[:7])                      # a split inside the request line
        time.sleep(0.05)
        client.send(request[7:])
        assert client.read().json()["amount"] == Decimal("7.77")


def test_pipelined_requests_are_answered_in_order_even_behind_a_slow_one(emu):
    admin(emu, "PUT", "/admin/configurations/delay", {"delay": 200})
    cid = str(uuid.uuid4())
    with Client(emu.address) as client:
        client.send(build("POST", "/payments", payment_body(cid, "3.00"))
                    + build("GET", f"/payments/{cid}")
                    + build("POST", "/payments", payment_body(cid, "3.00"))
                    + build("GET", "/admin/payments-summary", headers={"X-Rinha-Token": TOKEN})
                    + build("GET", "/nope"))
        statuses = [client.read() for _ in range(5)]
    assert [r.status for r in statuses] == [200, 200, 422, 200, 404]
    assert statuses[1].json()["correlationId"] == cid
    assert statuses[3].json()["totalRequests"] == 1


def test_client_half_close_still_gets_the_pending_answers(emu):
    admin(emu, "PUT", "/admin/configurations/delay", {"delay": 200})
    with Client(emu.address) as client:
        client.send(build("POST", "/payments", payment_body(uuid.uuid4()))
                    + build("GET", "/nope"))
        client.sock.shutdown(socket.SHUT_WR)
        assert [client.read().status for _ in range(2)] == [200, 404]
        assert client.closed_by_peer()


def test_connection_close_is_honoured(emu):
    with Client(emu.address) as client:
        answer = client.request("GET", f"/payments/{uuid.uuid4()}", headers={"Connection": "close"})
        assert answer.status == 404
        assert answer.headers.get("connection") == "close"
        assert client.closed_by_peer()
    with Client(emu.address) as client:                # HTTP/1.0 closes by default
        client.send(build("GET", f"/payments/{uuid.uuid4()}", version="HTTP/1.0"))
        assert client.read().status == 404
        assert client.closed_by_peer()
    with Client(emu.address) as client:                # ...unless asked to keep it alive
        for _ in range(2):
            client.send(build("GET", "/nope", headers={"Connection": "keep-alive"},
                              version="HTTP/1.0"))
            answer = client.read()
            assert answer.status == 404 and answer.headers["connection"] == "keep-alive"


def test_expect_100_continue_gets_an_interim_answer(emu):
    body = payment_body(uuid.uuid4())
    with Client(emu.address) as client:
        head = build("POST", "/payments", body, headers={"Expect": "100-continue"})
        client.send(head[:-len(body)])
        assert client.read().status == 100
        client.send(body)
        assert client.read().status == 200


def test_malformed_request_line_gets_400_and_close(emu):
    with Client(emu.address) as client:
        client.send(b"garbage\r\n\r\n")
        assert client.read().status == 400
        assert client.closed_by_peer()


# ---------------------------------------------------------------------------
# Fault modes (not in the real processor): PUT /admin/configurations/chaos,
# PUT /admin/configurations/refuse, GET /admin/chaos
# ---------------------------------------------------------------------------

def set_chaos(emu, **modes) -> Response:
    answer = admin(emu, "PUT", "/admin/configurations/chaos", modes)
    assert answer.status == 200, answer
    return answer


def faults(emu) -> dict:
    return admin(emu, "GET", "/admin/chaos").json()["faults"]


def exchange(emu, data: bytes, timeout=10.0):
    """Send raw bytes, read until the emulator ends the connection: (bytes, "eof" | "reset")."""
    with Client(emu.address, timeout) as client:
        client.send(data)
        received = b""
        while True:
            try:
                chunk = client.sock.recv(65536)
            except ConnectionResetError:
                return received, "reset"
            if not chunk:
                return received, "eof"
            received += chunk


def stored(emu, cid) -> bool:
    status = call(emu, "GET", f"/payments/{cid}").status
    assert status in (200, 404)
    return status == 200


def payment_request(cid) -> bytes:
    return build("POST", "/payments", payment_body(cid))


def full_answer(emu) -> bytes:
    """The exact bytes of a normal 200 answer to a payment (the emulator's own rendering)."""
    data, how = exchange(emu, build("POST", "/payments", payment_body(uuid.uuid4()),
                                    headers={"Connection": "close"}))
    assert how == "eof"
    return data


def test_reset_before_resets_the_connection_and_stores_nothing(emu):
    set_chaos(emu, reset_before=1)
    cid = uuid.uuid4()
    assert exchange(emu, payment_request(cid)) == (b"", "reset")
    set_chaos(emu)
    assert not stored(emu, cid)
    assert faults(emu)["reset_before"] >= 1


def test_reset_after_stores_the_payment_then_resets_without_an_answer(emu):
    set_chaos(emu, reset_after=1)
    cid = uuid.uuid4()
    assert exchange(emu, payment_request(cid)) == (b"", "reset")
    assert stored(emu, cid)
    assert count(emu) == 1


def test_partial_answer_stores_the_payment_and_sends_a_strict_prefix_then_closes(emu):
    whole = full_answer(emu).replace(b"Connection: close\r\n", b"")
    head_length = whole.index(b"\r\n\r\n") + 4
    set_chaos(emu, partial=1, seed=7)
    kinds = set()
    for _ in range(8):
        cid = uuid.uuid4()
        data, how = exchange(emu, payment_request(cid))
        assert how == "eof" and stored(emu, cid)
        assert whole.startswith(data) and len(data) < len(whole)
        kinds.add("headers" if len(data) == head_length else "half")
        if len(data) != head_length:
            assert len(data) == head_length + (len(whole) - head_length) // 2
    assert kinds == {"headers", "half"}


def test_stall_holds_the_answer_then_closes_or_answers_with_the_payment_stored(emu):
    set_chaos(emu, stall=1, stall_ms=300, stall_close=1)
    cid = uuid.uuid4()
    started = time.monotonic()
    assert exchange(emu, payment_request(cid)) == (b"", "eof")
    assert time.monotonic() - started >= 0.3
    assert stored(emu, cid)
    set_chaos(emu, stall=1, stall_ms=300, stall_close=0)
    started = time.monotonic()
    answer = pay(emu)
    assert time.monotonic() - started >= 0.3
    assert answer.status == 200


@pytest.mark.parametrize("mode, status", [("error_500", 500), ("error_429", 429)])
def test_error_modes_answer_their_status_and_store_nothing(emu, mode, status):
    set_chaos(emu, **{mode: 1})
    cid = uuid.uuid4()
    assert pay(emu, cid).status == status
    assert not stored(emu, cid)
    assert faults(emu)[mode] >= 1


def test_latency_spike_delays_the_answer_and_still_stores(emu):
    set_chaos(emu, spike=1, spike_ms=300)
    cid = uuid.uuid4()
    started = time.monotonic()
    assert pay(emu, cid).status == 200
    assert time.monotonic() - started >= 0.3
    assert stored(emu, cid)


def _outcomes(emu, n):
    out = []
    for _ in range(n):
        cid = uuid.uuid4()
        data, how = exchange(emu, build("POST", "/payments", payment_body(cid),
                                        headers={"Connection": "close"}))
        status = data.split(b" ", 2)[1] if data.startswith(b"HTTP/1.1 ") else b"-"
        out.append((how, status, len(data), stored(emu, cid)))
    return out


def test_same_seed_gives_the_same_faults_and_other_seeds_differ(emu):
    modes = dict(reset_before=0.15, reset_after=0.15, partial=0.15, error_500=0.15,
                 error_429=0.15, stall=0.1, stall_ms=20, spike=0.2, spike_ms=5)
    runs = []
    for seed in (11, 11, 12):
        set_chaos(emu, seed=seed, **modes)
        runs.append(_outcomes(emu, 30))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert len({o[:2] for o in runs[0]}) >= 4          # several kinds of outcome happened


def test_cleared_chaos_answers_byte_identical_to_no_chaos(emu):
    before = full_answer(emu)
    set_chaos(emu, reset_before=1)
    assert set_chaos(emu).json()["is"] == {}
    assert full_answer(emu) == before
    with Client(emu.address) as client:                 # keep-alive as before
        assert [client.request("POST", "/payments", payment_body(uuid.uuid4())).status
                for _ in range(3)] == [200] * 3


@pytest.mark.parametrize("doc", [
    {"reset_before": 0.6, "reset_after": 0.6},          # the exclusive modes add up to > 1
    {"partial": 1.5}, {"spike": -0.1}, {"stall": "0.5"}, {"stall_ms": 60_001},
    {"seed": -1}, {"explode": 0.1},
])
def test_invalid_chaos_settings_get_400_and_change_nothing(emu, doc):
    assert admin(emu, "PUT", "/admin/configurations/chaos", doc).status == 400
    assert admin(emu, "GET", "/admin/chaos").json()["chaos"] == {}
    assert pay(emu).status == 200


def test_fault_mode_endpoints_require_the_token(emu):
    assert admin(emu, "PUT", "/admin/configurations/chaos", {"error_500": 1}, token="x").status == 401
    assert admin(emu, "PUT", "/admin/configurations/refuse", {"ms": 100}, token=None).status == 401
    assert admin(emu, "GET", "/admin/chaos", token="x").status == 401
    assert pay(emu).status == 200


def _connect_refused(address) -> bool:
    try:
        socket.create_connection(address, timeout=2).close()
        return False
    except ConnectionRefusedError:
        return True


def test_refuse_closes_connections_refuses_new_ones_then_reopens_with_payments_kept(fresh):
    emu = fresh()
    cid = uuid.uuid4()
    assert pay(emu, cid).status == 200
    with Client(emu.address) as idle:
        assert idle.request("GET", f"/payments/{cid}").status == 200
        answer = admin(emu, "PUT", "/admin/configurations/refuse", {"ms": 1500})
        assert answer.status == 200 and answer.json() == {"config": "refuse", "ms": 1500}
        assert idle.closed_by_peer()                    # open connections are closed
    assert _connect_refused(emu.address)                # new ones are refused
    deadline = time.monotonic() + 10
    while _connect_refused(emu.address):
        assert time.monotonic() < deadline, "the listener was not reopened"
        time.sleep(0.05)
    assert stored(emu, cid)                             # same process, same records
    assert pay(emu).status == 200
    assert faults(emu)["refusals"] == 1


# ---------------------------------------------------------------------------
# Process: unix socket, signals
# ---------------------------------------------------------------------------

def test_unix_socket_listener_serves_the_same_api(fresh, tmp_path):
    path = str(tmp_path / "processor.sock")
    emu = fresh("--unix", path)
    assert emu.address == path
    assert pay(emu).status == 200
    assert count(emu) == 1
    assert emu.stop() == 0
    assert not os.path.exists(path)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_emulator_with_exit_status_0(signum):
    emu = Emulator()
    admin(emu, "PUT", "/admin/configurations/delay", {"delay": 5000})
    client = Client(emu.address)
    client.send(build("POST", "/payments", payment_body(uuid.uuid4())))   # still in its delay
    time.sleep(0.1)
    assert emu.stop(signum) == 0
    assert client.closed_by_peer()                    # it did not wait out the payment's delay
    client.close()



def test_main_is_importable_and_parses_the_documented_options():
    from bench import processor
    assert callable(processor.main)
    args = processor.parse_args(["--port", "8001", "--fee", "0.05", "--unix", "/tmp/x.sock",
                                 "--token", "t", "--base-latency-ms", "2",
                                 "--health-window-s", "1", "--host", "0.0.0.0"])
    assert (args.port, args.fee, args.unix, args.token) == (8001, Decimal("0.05"), "/tmp/x.sock", "t")
    assert (args.base_latency_ms, args.health_window_s, args.host) == (2.0, 1.0, "0.0.0.0")
    defaults = processor.parse_args([])
    assert (defaults.port, defaults.host, defaults.token) == (8080, "127.0.0.1", "123")
    assert (defaults.base_latency_ms, defaults.health_window_s) == (0.0, 5.0)
