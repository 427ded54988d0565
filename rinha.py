#!/usr/bin/env python3
"""rinha: a payment intermediary for the Rinha de Backend 2025, in one file.

Clients POST /payments; the service journals the payment, answers 202 at once, and
forwards it to the default payment processor (or, only when waiting costs more, to
the fallback). GET /payments-summary reports exactly what the processors confirmed,
for the whole backend. Read top to bottom, this file is the path of a payment:
configuration, wire formats, HTTP parsing, ledger and journal, queue, processor
client, router and breaker, server, main. Runtime dependencies: uvloop and orjson.
"""
import array
import asyncio
import bisect
import gc
import os
import re
import signal
import socket
import sys
import time
from datetime import datetime, timezone
from decimal import ROUND_HALF_EVEN, Decimal
from urllib.parse import parse_qsl

import orjson
import uvloop

# ---------------------------------------------------------------------------
# Configuration
# Every limit and knob, read once from the environment at start-up. README.md's
# configuration table lists each one with its default and meaning.
# ---------------------------------------------------------------------------


def env_str(name, default):
    return os.environ.get(name, default)


def env_int(name, default):
    return int(os.environ.get(name, default))


def env_float(name, default):
    return float(os.environ.get(name, default))


INSTANCE_ID = env_str("INSTANCE_ID", "api")
LISTEN = env_str("LISTEN", "0.0.0.0:8080")
PEERS = env_str("PEERS", "")
DEFAULT_PROCESSOR_URL = env_str("DEFAULT_PROCESSOR_URL", "http://payment-processor-default:8080")
FALLBACK_PROCESSOR_URL = env_str("FALLBACK_PROCESSOR_URL", "http://payment-processor-fallback:8080")
JOURNAL_PATH = env_str("JOURNAL_PATH", f"./{INSTANCE_ID}.journal")
JOURNAL_FSYNC = env_int("JOURNAL_FSYNC", 0)
PURGE_TOKEN = env_str("PURGE_TOKEN", "")

QUEUE_CAPACITY = env_int("QUEUE_CAPACITY", 100_000)
WORKERS = env_int("WORKERS", 16)
PROCESSOR_TIMEOUT_S = env_float("PROCESSOR_TIMEOUT_S", 10.0)
BREAKER_FAILURES = env_int("BREAKER_FAILURES", 3)
BREAKER_RETRY_S = env_float("BREAKER_RETRY_S", 0.25)
FALLBACK_HOLD_S = env_float("FALLBACK_HOLD_S", 30.0)
FALLBACK_QUEUE_FRACTION = env_float("FALLBACK_QUEUE_FRACTION", 0.8)
PIN_SETTLE_S = env_float("PIN_SETTLE_S", 30.0)
HEALTH_INTERVAL_S = env_float("HEALTH_INTERVAL_S", 10.0)
HOLD_POLL_S = env_float("HOLD_POLL_S", 0.05)
PEER_TIMEOUT_S = env_float("PEER_TIMEOUT_S", 2.0)
SHUTDOWN_GRACE_S = env_float("SHUTDOWN_GRACE_S", 10.0)

MAX_HEADER_BYTES = env_int("MAX_HEADER_BYTES", 8192)
MAX_BODY_BYTES = env_int("MAX_BODY_BYTES", 16384)
MAX_CONNECTIONS = env_int("MAX_CONNECTIONS", 2048)
READ_TIMEOUT_S = env_float("READ_TIMEOUT_S", 10.0)
IDLE_TIMEOUT_S = env_float("IDLE_TIMEOUT_S", 600.0)
LINGER_S = env_float("LINGER_S", 2.0)
LINGER_BYTES = env_int("LINGER_BYTES", 4 << 20)
MAX_AMOUNT = Decimal(env_str("MAX_AMOUNT", "1000000000"))
MAX_AMOUNT_CENTS = int(MAX_AMOUNT * 100)

DEFAULT, FALLBACK = 0, 1
PROCESSOR_NAMES = ("default", "fallback")


def log(message):
    sys.stderr.write(f"{INSTANCE_ID}: {message}\n")
    sys.stderr.flush()


# ---------------------------------------------------------------------------
# Wire formats
# Timestamps are integer milliseconds since the epoch; amounts are integer cents.
# Converting to and from text happens only here, exactly and the same way both ways.
# ---------------------------------------------------------------------------

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
UUID_PATTERN = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_second_text = [-1, b""]  # cache: the formatted second changes once a second, not once a payment


def now_ms():
    return time.time_ns() // 1_000_000


def iso_ms(ms):
    """1752150896789 -> b'2025-07-10T12:34:56.789Z' (JavaScript's toISOString form)."""
    second, milli = divmod(ms, 1000)
    if second != _second_text[0]:
        _second_text[0] = second
        _second_text[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode()
    return b"%s.%03dZ" % (_second_text[1], milli)


def parse_iso_ms(text, round_up):
    """An ISO-8601 timestamp (Z, offset, or naive = UTC) -> ms; sub-ms precision rounds
    inward (up for a window's start, down for its end) so the window stays inclusive."""
    stamp = datetime.fromisoformat(text)  # ValueError on anything else
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    delta = stamp - EPOCH
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return -(-micros // 1000) if round_up else micros // 1000


def amount_to_cents(value):
    """A JSON number -> cents, rounded half to even as the processors store amounts;
    None if it is not a finite number. The float's shortest repr is the decimal read.
    Exact at any magnitude (1e308 included): a repr has at most 17 digits, so shifting it
    two places stays within Decimal's precision, and rounding to an integer has no limit."""
    if type(value) is int:
        return value * 100
    if type(value) is not float or value != value or value in (float("inf"), float("-inf")):
        return None
    text = repr(value)
    whole, dot, fraction = text.partition(".")
    if "e" not in text and len(fraction) <= 2:
        sign = -1 if whole.startswith("-") else 1
        return int(whole) * 100 + sign * int(fraction.ljust(2, "0"))
    return int(Decimal(text).scaleb(2).to_integral_value(ROUND_HALF_EVEN))


def cents_text(cents):
    """1990 -> b'19.90', a JSON number with exactly two decimals."""
    sign = b"-" if cents < 0 else b""
    whole, fraction = divmod(abs(cents), 100)
    return b"%s%d.%02d" % (sign, whole, fraction)


def response(status, body=b"", content_type=b"application/json", extra=b"", close=False):
    """The complete bytes of an HTTP/1.1 response."""
    connection = b"Connection: close\r\n" if close else b""
    kind = b"Content-Type: %s\r\n" % content_type if body else b""
    return b"HTTP/1.1 %s\r\n%s%s%sContent-Length: %d\r\n\r\n%s" % (
        status, kind, extra, connection, len(body), body)


def error_body(message, field=None):
    return orjson.dumps({"error": message, "field": field} if field else {"error": message})


ACCEPTED = (response(b"202 Accepted"), response(b"202 Accepted", close=True))
PURGED = (response(b"200 OK", b'{"message":"purged"}'), response(b"200 OK", b'{"message":"purged"}', close=True))
SUMMARY_BODY = (b'{"default":{"totalRequests":%d,"totalAmount":%s},'
                b'"fallback":{"totalRequests":%d,"totalAmount":%s}}')
PROCESSOR_BODY = b'{"correlationId":"%s","amount":%s,"requestedAt":"%s"}'

# ---------------------------------------------------------------------------
# HTTP parsing
# Turns a request head into its parts or a named error; never reads past what it was
# given. Framing errors (the stream can't be trusted afterwards) close the connection.
# ---------------------------------------------------------------------------


class HttpError(Exception):
    """A request the server refuses: status line, message for the client, and whether
    the connection must close because the byte stream can no longer be trusted."""
    status = b"400 Bad Request"
    closes = True
    extra = b""  # further header lines of the answer

    def __init__(self, message, field=None):
        super().__init__(message)
        self.message = message
        self.field = field

    def response(self, close):
        return response(self.status, error_body(self.message, self.field),
                        extra=self.extra, close=close or self.closes)


class MalformedRequest(HttpError):
    status = b"400 Bad Request"


class HeadersTooLarge(HttpError):
    status = b"431 Request Header Fields Too Large"


class BodyTooLarge(HttpError):
    status = b"413 Content Too Large"


class LengthRequired(HttpError):
    status = b"411 Length Required"


class TransferEncodingNotSupported(HttpError):
    status = b"501 Not Implemented"


class VersionNotSupported(HttpError):
    status = b"505 HTTP Version Not Supported"


class RequestTimeout(HttpError):
    status = b"408 Request Timeout"


class InvalidPayment(HttpError):
    status = b"400 Bad Request"
    closes = False


class InvalidQuery(HttpError):
    status = b"400 Bad Request"
    closes = False


class NotFound(HttpError):
    status = b"404 Not Found"
    closes = False


class MethodNotAllowed(HttpError):
    status = b"405 Method Not Allowed"
    closes = False

    def __init__(self, allow):
        super().__init__("method not allowed")
        self.extra = b"Allow: %s\r\n" % allow


class Forbidden(HttpError):
    status = b"403 Forbidden"
    closes = False


class QueueFull(HttpError):
    status = b"503 Service Unavailable"
    closes = False
    extra = b"Retry-After: 1\r\n"


class Unavailable(HttpError):
    status = b"503 Service Unavailable"
    closes = False


class PeerUnavailable(HttpError):
    status = b"502 Bad Gateway"
    closes = False


class Request:
    """A parsed request head. One per request; the body is attached by the server."""
    __slots__ = ("line", "method", "path", "query", "keep_alive", "length", "token")

    def __init__(self, line, method, path, query, keep_alive, length, token):
        self.line, self.method, self.path, self.query = line, method, path, query
        self.keep_alive, self.length, self.token = keep_alive, length, token


def parse_head(head):
    """Request line and headers (without the final CRLFCRLF) -> Request, or an HttpError."""
    lines = head.split(b"\r\n")
    if head.count(b"\n") != len(lines) - 1 or head.count(b"\r") != len(lines) - 1:
        raise MalformedRequest("bare CR or LF in the request head")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1].startswith(b"/"):
        raise MalformedRequest("malformed request line")
    method, target, version = parts
    if version == b"HTTP/1.1":
        keep_alive = True
    elif version == b"HTTP/1.0":
        keep_alive = False
    elif version.startswith(b"HTTP/"):
        raise VersionNotSupported("only HTTP/1.0 and HTTP/1.1 are supported")
    else:
        raise MalformedRequest("malformed request line")
    length = None
    chunked = False
    token = b""
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise MalformedRequest("malformed header line")
        name = name.lower()
        value = value.strip()
        if name == b"content-length":
            if not value.isdigit() or len(value) > 18:
                raise MalformedRequest("invalid Content-Length")
            if length is not None and int(value) != length:
                raise MalformedRequest("conflicting Content-Length headers")
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = True
        elif name == b"connection":
            options = [option.strip() for option in value.lower().split(b",")]
            if b"close" in options:
                keep_alive = False
            elif b"keep-alive" in options:
                keep_alive = True
        elif name == b"x-rinha-token":
            token = value
    if chunked:
        if length is not None:
            raise MalformedRequest("both Content-Length and Transfer-Encoding")
        raise TransferEncodingNotSupported("Transfer-Encoding is not supported; send Content-Length")
    if length is None:
        if method == b"POST" or method == b"PUT":
            raise LengthRequired("Content-Length is required")
        length = 0
    if length > MAX_BODY_BYTES:
        raise BodyTooLarge(f"body over {MAX_BODY_BYTES} bytes")
    path, _, query = target.partition(b"?")
    return Request(lines[0], method, path, query, keep_alive, length, token)


def parse_payment(body):
    """POST /payments body -> (correlationId, cents), or InvalidPayment naming the field."""
    try:
        payment = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidPayment("body is not valid JSON") from None
    if type(payment) is not dict:
        raise InvalidPayment("body must be a JSON object")
    cid = payment.get("correlationId")
    if type(cid) is not str or len(cid) != 36 or not UUID_PATTERN.fullmatch(cid):
        raise InvalidPayment("correlationId must be a UUID string", "correlationId")
    cents = amount_to_cents(payment.get("amount"))
    if cents is None or cents <= 0 or cents > MAX_AMOUNT_CENTS:
        raise InvalidPayment(f"amount must be a number over 0.00 and at most {MAX_AMOUNT}", "amount")
    return cid.encode(), cents


def parse_window(query):
    """from/to query parameters -> inclusive (from_ms, to_ms); absent bounds are open."""
    low, high = -(1 << 62), 1 << 62
    try:
        pairs = parse_qsl(query.decode("latin-1"))
    except ValueError:
        raise InvalidQuery("malformed query string") from None
    for name, value in pairs:
        if name not in ("from", "to") or not value:
            continue
        try:  # a '+' offset arrives as a space once the query is decoded
            stamp = parse_iso_ms(value.replace(" ", "+"), round_up=(name == "from"))
        except ValueError:
            raise InvalidQuery(f"{name} must be an ISO-8601 timestamp", name) from None
        if name == "from":
            low = stamp
        else:
            high = stamp
    return low, high


# ---------------------------------------------------------------------------
# Ledger and journal
# The ledger holds confirmed payments only, per processor, in flat integer arrays the
# garbage collector never walks. The journal is an append-only file written before
# every answer and every send; replaying it rebuilds the ledger and the queue.
# ---------------------------------------------------------------------------


class Ledger:
    """Confirmed payments per processor: requestedAt (ms) kept sorted, and prefix sums of
    cents, so a window's count and total are two binary searches and a subtraction."""
    __slots__ = ("times", "prefix")

    def __init__(self):
        self.clear()

    def clear(self):
        self.times = (array.array("q"), array.array("q"))
        self.prefix = (array.array("q", [0]), array.array("q", [0]))

    def record(self, processor, ms, cents):
        times, prefix = self.times[processor], self.prefix[processor]
        if not times or ms >= times[-1]:
            times.append(ms)
            prefix.append(prefix[-1] + cents)
            return
        # Out of order: only payments sent after this one and confirmed before it follow.
        at = bisect.bisect_right(times, ms)
        times.insert(at, ms)
        prefix.insert(at + 1, prefix[at] + cents)
        for i in range(at + 2, len(prefix)):
            prefix[i] += cents

    def window(self, processor, low, high):
        """(count, cents) of payments with low <= requestedAt <= high."""
        times, prefix = self.times[processor], self.prefix[processor]
        first = bisect.bisect_left(times, low)
        last = bisect.bisect_right(times, high)
        if last <= first:
            return 0, 0
        return last - first, prefix[last] - prefix[first]

    def entries(self, processor):
        times, prefix = self.times[processor], self.prefix[processor]
        for i in range(len(times)):
            yield times[i], prefix[i + 1] - prefix[i]


class Journal:
    """Append-only record of this instance. Lines:
    A cid cents accepted_ms      accepted, queued       S cid proc requested_ms   about to send
    C cid proc requested_ms cents  confirmed            X cid    settled, not counted (duplicate)
    U cid                        a pinned attempt proved not to have landed
    L proc requested_ms cents    a confirmed payment (compacted form)   P   purge: ledger emptied"""
    __slots__ = ("path", "fd")

    def __init__(self, path):
        self.path = path
        self.fd = -1

    def replay(self, ledger):
        """Rebuild the ledger; return pending payments {cid: [cents, accepted_ms, pin]} in order."""
        pending = {}
        if not os.path.exists(self.path):
            return pending
        with open(self.path, "rb") as lines:
            for number, line in enumerate(lines, 1):
                fields = line.split()
                try:
                    kind = fields[0]
                    if kind == b"A":
                        pending[fields[1]] = [int(fields[2]), int(fields[3]), None]
                    elif kind == b"S" and fields[1] in pending:
                        pending[fields[1]][2] = (int(fields[2]), int(fields[3]))
                    elif kind == b"C":
                        pending.pop(fields[1], None)
                        ledger.record(int(fields[2]), int(fields[3]), int(fields[4]))
                    elif kind == b"X":
                        pending.pop(fields[1], None)
                    elif kind == b"U" and fields[1] in pending:
                        pending[fields[1]][2] = None
                    elif kind == b"L":
                        ledger.record(int(fields[1]), int(fields[2]), int(fields[3]))
                    elif kind == b"P":
                        ledger.clear()
                except (IndexError, ValueError):
                    log(f"journal line {number} unreadable, skipped: {line[:80]!r}")
        return pending

    def open_compacted(self, ledger, pending):
        """Rewrite the journal as the ledger plus the pending payments, then append to it."""
        temporary = self.path + ".compact"
        with open(temporary, "wb") as out:
            for processor in (DEFAULT, FALLBACK):
                for ms, cents in ledger.entries(processor):
                    out.write(b"L %d %d %d\n" % (processor, ms, cents))
            for cid, (cents, accepted, pin) in pending.items():
                out.write(b"A %s %d %d\n" % (cid, cents, accepted))
                if pin:
                    out.write(b"S %s %d %d\n" % (cid, pin[0], pin[1]))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, line):
        """Write one line; OSError if it could not be written whole (disk full, I/O error)."""
        if os.write(self.fd, line) != len(line):
            raise OSError("short write to the journal")
        if JOURNAL_FSYNC:
            os.fdatasync(self.fd)

    def size(self):
        return os.fstat(self.fd).st_size if self.fd >= 0 else 0


# ---------------------------------------------------------------------------
# Queue
# Accepted, unconfirmed payments, oldest first, as immutable (cid, cents, accepted_ms)
# tuples that the collector stops tracking. Capacity counts the payments out with a
# worker too, so a payment handed back always has its slot.
# ---------------------------------------------------------------------------


class PaymentQueue:
    """A double-ended ring over a list of QUEUE_CAPACITY slots allocated at start."""
    __slots__ = ("slots", "head", "size", "taken", "capacity", "waiters")

    def __init__(self, capacity):
        self.slots = [None] * capacity
        self.capacity = capacity
        self.head = 0
        self.size = 0
        self.taken = 0  # handed to workers, not yet settled
        self.waiters = []

    def full(self):
        return self.size + self.taken >= self.capacity

    def nearly_full(self):
        """Queued (not counting payments out with workers) past FALLBACK_QUEUE_FRACTION."""
        return self.size >= self.capacity * FALLBACK_QUEUE_FRACTION

    def push(self, payment):
        if self.size + self.taken >= self.capacity:  # callers check full() first
            raise OverflowError("payment queue over capacity")
        self.slots[(self.head + self.size) % self.capacity] = payment
        self.size += 1
        while self.waiters:
            waiter = self.waiters.pop()
            if not waiter.done():
                waiter.set_result(None)
                break

    def take(self):
        """The oldest payment, now counted as taken; None if the queue is empty."""
        if not self.size:
            return None
        payment = self.slots[self.head]
        self.slots[self.head] = None
        self.head = (self.head + 1) % self.capacity
        self.size -= 1
        self.taken += 1
        return payment

    def give_back(self, payment):
        """A taken payment returns to the front, keeping its place in line."""
        self.taken -= 1
        self.head = (self.head - 1) % self.capacity
        self.slots[self.head] = payment
        self.size += 1

    def settle(self):
        self.taken -= 1

    async def wait(self):
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        await waiter


# ---------------------------------------------------------------------------
# Processor client
# A keep-alive HTTP/1.1 connection pool per upstream (processor or peer), over TCP or
# a unix socket. One request per connection at a time; any doubt closes the connection.
# ---------------------------------------------------------------------------


class UpstreamError(Exception):
    """No usable answer: connection refused or lost, timeout, or a malformed response."""


def parse_address(url):
    """'http://host:port' or 'unix:/path' -> (host or None, port or path)."""
    if url.startswith("unix:"):
        return None, url[5:]
    rest = url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = rest.rpartition(":")
    return (host, int(port)) if host else (rest, 80)


def parse_response(buffer):
    """(status, body, keep_alive, consumed) for one complete response, or None for more."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > 65536:
            raise UpstreamError("response head too large")
        return None
    lines = bytes(buffer[:end]).split(b"\r\n")
    status_line = lines[0].split(b" ", 2)
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise UpstreamError("malformed status line")
    status = int(status_line[1])
    keep_alive = status_line[0] == b"HTTP/1.1"
    length, chunked = None, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        value = value.strip().lower()
        if name == b"content-length" and value.isdigit():
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value:
            chunked = True
        elif name == b"connection":
            keep_alive = b"close" not in value and (keep_alive or b"keep-alive" in value)
    start = end + 4
    if chunked:
        return parse_chunked(buffer, start, status, keep_alive)
    if length is None:
        length = 0 if status in (204, 304) or status < 200 else -1
    if length < 0:  # body delimited by the connection closing: not supported
        raise UpstreamError("response without length")
    if len(buffer) < start + length:
        return None
    return status, bytes(buffer[start:start + length]), keep_alive, start + length


def parse_chunked(buffer, at, status, keep_alive):
    body = bytearray()
    while True:
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            return None
        try:
            size = int(bytes(buffer[at:line_end]).split(b";")[0], 16)
        except ValueError:
            raise UpstreamError("malformed chunk size") from None
        at = line_end + 2
        if size == 0:
            trailer_end = buffer.find(b"\r\n", at)
            while trailer_end > at:  # skip trailer fields
                at = trailer_end + 2
                trailer_end = buffer.find(b"\r\n", at)
            if trailer_end < 0:
                return None
            return status, bytes(body), keep_alive, trailer_end + 2
        if len(buffer) < at + size + 2:
            return None
        body += buffer[at:at + size]
        at += size + 2


class UpstreamConnection(asyncio.Protocol):
    __slots__ = ("transport", "buffer", "waiter", "timer", "reusable")

    def __init__(self):
        self.transport = None
        self.buffer = bytearray()
        self.waiter = None
        self.timer = None
        self.reusable = True

    def connection_made(self, transport):
        self.transport = transport

    def send(self, data, timeout):
        if self.transport.is_closing():
            raise UpstreamError("connection closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.timer = asyncio.get_running_loop().call_later(timeout, self.fail, "timeout")
        self.transport.write(data)
        return self.waiter

    def data_received(self, data):
        self.buffer += data
        if self.waiter is None:
            return self.fail("unsolicited data")
        try:
            parsed = parse_response(self.buffer)
        except UpstreamError as error:
            return self.fail(str(error))
        if parsed is None:
            return
        status, body, keep_alive, consumed = parsed
        del self.buffer[:consumed]
        self.reusable = keep_alive and not self.buffer
        waiter, self.waiter = self.waiter, None
        self.timer.cancel()
        if not waiter.done():
            waiter.set_result((status, body))

    def connection_lost(self, exc):
        self.fail("connection lost")

    def fail(self, reason):
        self.reusable = False
        if self.timer is not None:
            self.timer.cancel()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(UpstreamError(reason))
        if self.transport is not None:
            self.transport.close()


class Upstream:
    """A pool of keep-alive connections to one HTTP server."""
    __slots__ = ("name", "host", "port", "idle", "host_header")

    def __init__(self, name, url):
        self.name = name
        self.host, self.port = parse_address(url)
        self.idle = []
        self.host_header = (f"{self.host}:{self.port}" if self.host else "localhost").encode()

    async def connect(self):
        loop = asyncio.get_running_loop()
        try:
            if self.host is None:
                _, connection = await loop.create_unix_connection(UpstreamConnection, self.port)
            else:
                _, connection = await loop.create_connection(UpstreamConnection, self.host, self.port)
        except OSError as error:
            raise UpstreamError(f"cannot connect to {self.name}: {error}") from None
        return connection

    async def request(self, method, path, body=b"", headers=b"", timeout=PROCESSOR_TIMEOUT_S):
        """(status, body); UpstreamError when no answer came. A GET that fails on a reused
        connection (the server may have closed it while idle) is tried once more afresh."""
        connection = None
        while self.idle and connection is None:
            connection = self.idle.pop()
            if not connection.reusable or connection.transport.is_closing():
                connection = None
        reused = connection is not None
        if connection is None:
            connection = await self.connect()
        data = b"%s %s HTTP/1.1\r\nHost: %s\r\n%sContent-Length: %d\r\n\r\n%s" % (
            method, path, self.host_header, headers, len(body), body)
        try:
            answer = await connection.send(data, timeout)
        except UpstreamError as error:
            connection.fail("failed")
            if reused and method == b"GET" and str(error) != "timeout":
                return await self.request(method, path, body, headers, timeout)
            raise
        except BaseException:
            connection.fail("abandoned")
            raise
        if connection.reusable:
            self.idle.append(connection)
        else:
            connection.fail("not reusable")
        return answer

    def close(self):
        for connection in self.idle:
            connection.fail("closing")
        self.idle.clear()


# ---------------------------------------------------------------------------
# Router and breaker
# Decides, payment by payment, where to send it or whether to hold it; learns from every
# answer and from the health endpoint. The default is preferred while it works at all;
# the fallback only takes payments that waited FALLBACK_HOLD_S, or when the queue nears
# capacity. A payment whose attempt may have landed stays pinned to that processor.
# ---------------------------------------------------------------------------

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"
UNKNOWN = 0  # status used when an attempt got no answer


class Breaker:
    """closed: send freely. open: send nothing until retry_at. half-open: one probe is out."""
    __slots__ = ("state", "failures", "retry_at", "confirmed", "failed", "health")

    def __init__(self):
        self.state = CLOSED
        self.failures = 0
        self.retry_at = 0.0
        self.confirmed = 0
        self.failed = 0
        self.health = None

    def allows(self, now):
        if self.state is CLOSED:
            return True
        if self.state is OPEN and now >= self.retry_at:
            self.state = HALF_OPEN  # the caller carries the probe
            return True
        return False

    def succeeded(self):
        self.state = CLOSED
        self.failures = 0
        self.confirmed += 1

    def failed_once(self, now):
        self.failed += 1
        self.failures += 1
        if self.state is not CLOSED or self.failures >= BREAKER_FAILURES:
            self.state = OPEN
            self.retry_at = now + BREAKER_RETRY_S

    def observe_health(self, failing, now):
        self.health = failing
        if failing and self.state is CLOSED:
            self.state = OPEN
            self.retry_at = now + BREAKER_RETRY_S
        elif not failing and self.state is OPEN:
            self.retry_at = now  # probe at once


class Pipeline:
    """Queue, breakers, upstreams, ledger and journal: everything a payment passes through."""

    def __init__(self, journal, ledger, pending=None):
        """pending: payments replayed from the journal, queued first (the queue grows to hold
        them all if they outnumber QUEUE_CAPACITY: they were accepted, they are never dropped)."""
        pending = pending or {}
        self.journal = journal
        self.ledger = ledger
        self.queue = PaymentQueue(max(QUEUE_CAPACITY, len(pending)))
        self.breakers = (Breaker(), Breaker())
        self.processors = (Upstream("default", DEFAULT_PROCESSOR_URL),
                           Upstream("fallback", FALLBACK_PROCESSOR_URL))
        self.pins = {}  # cid -> (processor, requested_ms) of an attempt that may have landed
        self.in_flight = 0
        self.accepted = 0
        self.duplicates = 0
        self.rejected = 0
        self.running = True
        for cid, (cents, accepted, pin) in pending.items():
            self.queue.push((cid, cents, accepted))
            if pin:
                self.pins[cid] = pin

    # -- accepting ---------------------------------------------------------
    def accept(self, cid, cents):
        """Journal then queue a payment; HttpError if it cannot be taken safely."""
        queue = self.queue
        if queue.full():
            raise QueueFull("queue full, retry later")
        accepted = now_ms()
        try:
            self.journal.append(b"A %s %d %d\n" % (cid, cents, accepted))
        except OSError as error:
            log(f"journal write failed: {error}")
            raise Unavailable("journal unavailable") from None
        queue.push((cid, cents, accepted))
        self.accepted += 1

    # -- routing -----------------------------------------------------------
    def choose(self, payment, now):
        """DEFAULT, FALLBACK, or None to hold the payment for now."""
        pin = self.pins.get(payment[0])
        default, fallback = self.breakers
        if pin is not None and pin[0] == FALLBACK:
            return FALLBACK if fallback.allows(now) else None
        if default.allows(now):
            return DEFAULT
        waited = now_ms() - payment[2] >= FALLBACK_HOLD_S * 1000
        if pin is None and (waited or self.queue.nearly_full()) and fallback.allows(now):
            return FALLBACK
        return None

    async def worker(self):
        queue = self.queue
        loop = asyncio.get_running_loop()
        while self.running:
            payment = queue.take()
            if payment is None:
                await queue.wait()
                continue
            processor = self.choose(payment, loop.time())
            if processor is None:
                queue.give_back(payment)
                await asyncio.sleep(HOLD_POLL_S)
                continue
            self.in_flight += 1
            try:
                settled = await self.forward(payment, processor)
            except (OSError, RuntimeError, ValueError) as error:  # a bug must not stop delivery
                log(f"attempt failed unexpectedly, will retry: {error!r}")
                settled = False
                await asyncio.sleep(HOLD_POLL_S)
            finally:
                self.in_flight -= 1
            if settled:
                queue.settle()
            else:
                queue.give_back(payment)

    async def forward(self, payment, processor):
        """One attempt. True when the payment is settled (confirmed or proved a duplicate)."""
        cid, cents, _ = payment
        pin = self.pins.get(cid)
        requested = pin[1] if pin is not None and pin[0] == processor else now_ms()
        journal = self.journal
        try:
            journal.append(b"S %s %d %d\n" % (cid, processor, requested))
        except OSError as error:
            log(f"journal write failed: {error}")
            await asyncio.sleep(HOLD_POLL_S)
            return False
        body = PROCESSOR_BODY % (cid, cents_text(cents), iso_ms(requested))
        breaker = self.breakers[processor]
        try:
            status, _ = await self.processors[processor].request(
                b"POST", b"/payments", body, b"Content-Type: application/json\r\n")
        except UpstreamError:
            status = UNKNOWN
        loop_now = asyncio.get_running_loop().time()
        if status == 422 and pin is not None:
            # Stored already: by our earlier attempt, unless another request used this id.
            status = await self.stored_by_us(processor, cid, requested)
        if status == 200:
            breaker.succeeded()
            self.pins.pop(cid, None)
            self.ledger.record(processor, requested, cents)
            self.journal_quietly(b"C %s %d %d %d\n" % (cid, processor, requested, cents))
            return True
        if status == 422 or 400 <= status < 500 and status != 429:
            # 422 on a clean attempt: someone else already sent this id; not ours to count.
            if status == 422:
                self.duplicates += 1
            else:
                self.rejected += 1
                log(f"{PROCESSOR_NAMES[processor]} rejected {cid.decode()} with {status}")
            self.journal_quietly(b"X %s\n" % cid)
            return True
        breaker.failed_once(loop_now)
        if status == UNKNOWN:
            self.pins[cid] = (processor, requested)
        return False

    async def stored_by_us(self, processor, cid, requested):
        """After a 422 on a pinned payment: 200 if the processor holds it with our
        requestedAt (our earlier attempt landed), 422 if with another, UNKNOWN if unsure."""
        try:
            status, body = await self.processors[processor].request(b"GET", b"/payments/" + cid)
            if status != 200:
                return UNKNOWN
            stored = parse_iso_ms(orjson.loads(body)["requestedAt"], round_up=False)
        except (UpstreamError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return UNKNOWN
        return 200 if stored == requested else 422

    def journal_quietly(self, line):
        try:
            self.journal.append(line)
        except OSError as error:  # replay will resend; the processor's 422 settles it then
            log(f"journal write failed: {error}")

    async def release_pins(self):
        """Free pinned payments held longer than PIN_SETTLE_S when their processor is down:
        GET /payments/{id} proves whether the attempt landed (confirm) or not (unpin)."""
        while self.running:
            await asyncio.sleep(PIN_SETTLE_S / 3)
            limit = now_ms() - PIN_SETTLE_S * 1000
            for cid, (processor, requested) in list(self.pins.items()):
                if requested > limit or self.breakers[processor].state is CLOSED:
                    continue
                try:
                    status, body = await self.processors[processor].request(
                        b"GET", b"/payments/" + cid, timeout=PROCESSOR_TIMEOUT_S)
                except UpstreamError:
                    continue
                if status == 404 and self.pins.get(cid) == (processor, requested):
                    del self.pins[cid]
                    self.journal_quietly(b"U %s\n" % cid)
                    log(f"{cid.decode()} proved absent from {PROCESSOR_NAMES[processor]}; unpinned")

    async def poll_health(self, processor):
        """GET /payments/service-health every HEALTH_INTERVAL_S (shared limit: 1 per 5 s)."""
        loop = asyncio.get_running_loop()
        upstream, breaker = self.processors[processor], self.breakers[processor]
        while self.running:
            try:
                status, body = await upstream.request(b"GET", b"/payments/service-health", timeout=8.0)
                if status in (200, 503):  # newer processors answer 503 while failing
                    breaker.observe_health(bool(orjson.loads(body).get("failing")), loop.time())
                else:
                    log(f"health of {upstream.name}: status {status}")
            except (UpstreamError, orjson.JSONDecodeError, AttributeError) as error:
                log(f"health of {upstream.name}: {error}")
            await asyncio.sleep(HEALTH_INTERVAL_S)

    def statistics(self):
        def processor(index):
            breaker = self.breakers[index]
            count, cents = self.ledger.window(index, -(1 << 62), 1 << 62)
            return {"confirmed": breaker.confirmed, "failed_attempts": breaker.failed,
                    "breaker": breaker.state, "reported_failing": breaker.health,
                    "ledger_requests": count, "ledger_amount": cents / 100}
        return {"queue": self.queue.size, "in_flight": self.in_flight, "pinned": len(self.pins),
                "accepted": self.accepted, "duplicates": self.duplicates, "rejected": self.rejected,
                "default": processor(DEFAULT), "fallback": processor(FALLBACK),
                "journal_bytes": self.journal.size()}


# ---------------------------------------------------------------------------
# Server
# One HttpConnection per client connection: buffers bytes, parses requests in order,
# answers each (pipelined ones in order), enforces the limits. Only the summary and the
# purge, which ask the peers, are asynchronous; reading pauses while they run.
# ---------------------------------------------------------------------------


class Server:
    """Shared state of the HTTP side: the pipeline, peers, open connections, counters."""

    def __init__(self, pipeline, peers):
        self.pipeline = pipeline
        self.peers = peers
        self.connections = set()
        self.draining = False
        self.started = time.monotonic()
        self.gc_pauses = [0, 0.0, 0.0]  # collections, total seconds, longest seconds
        self.gc_started = 0.0

    def on_gc(self, phase, info):
        if phase == "start":
            self.gc_started = time.perf_counter()
        else:
            pause = time.perf_counter() - self.gc_started
            self.gc_pauses[0] += 1
            self.gc_pauses[1] += pause
            self.gc_pauses[2] = max(self.gc_pauses[2], pause)

    def sweep(self):
        """Once a second: close connections that stalled mid-request or idled too long."""
        now = time.monotonic()
        for connection in list(self.connections):
            connection.check_deadline(now)

    # -- endpoints ---------------------------------------------------------
    async def summary(self, request):
        low, high = parse_window(request.query)
        totals = self.local_totals(low, high)
        path = b"/internal/summary?from_ms=%d&to_ms=%d" % (low, high)
        for part in await self.ask_peers(b"GET", path, b""):
            numbers = part.split()
            if len(numbers) != 4:
                raise PeerUnavailable("a peer sent an unreadable summary")
            totals = [a + int(b) for a, b in zip(totals, numbers)]
        return SUMMARY_BODY % (totals[0], cents_text(totals[1]), totals[2], cents_text(totals[3]))

    def local_totals(self, low, high):
        ledger = self.pipeline.ledger
        count_d, cents_d = ledger.window(DEFAULT, low, high)
        count_f, cents_f = ledger.window(FALLBACK, low, high)
        return [count_d, cents_d, count_f, cents_f]

    async def purge(self, request):
        if not PURGE_TOKEN:
            raise Forbidden("purge is disabled: set PURGE_TOKEN")
        if request.token != PURGE_TOKEN.encode():
            raise Forbidden("wrong or missing X-Rinha-Token")
        self.purge_local()
        await self.ask_peers(b"POST", b"/internal/purge", b"X-Rinha-Token: %s\r\n" % request.token)

    def purge_local(self):
        self.pipeline.ledger.clear()
        self.pipeline.journal_quietly(b"P\n")
        log("ledger purged")

    async def ask_peers(self, method, path, headers):
        """Every peer's answer body, or PeerUnavailable: never a silent partial answer."""
        if not self.peers:
            return []
        calls = [peer.request(method, path, b"", headers, PEER_TIMEOUT_S) for peer in self.peers]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        bodies = []
        for peer, answer in zip(self.peers, answers):
            if isinstance(answer, BaseException) or answer[0] != 200:
                detail = answer if isinstance(answer, BaseException) else f"status {answer[0]}"
                raise PeerUnavailable(f"peer {peer.name} unavailable: {detail}")
            bodies.append(answer[1])
        return bodies

    def health(self):
        statistics = self.pipeline.statistics()
        statistics["instance"] = INSTANCE_ID
        statistics["uptime_s"] = round(time.monotonic() - self.started, 1)
        statistics["connections"] = len(self.connections)
        statistics["gc"] = {"collections": self.gc_pauses[0],
                            "total_ms": round(self.gc_pauses[1] * 1000, 3),
                            "longest_ms": round(self.gc_pauses[2] * 1000, 3)}
        return orjson.dumps(statistics)


class HttpConnection(asyncio.Protocol):
    __slots__ = ("server", "transport", "buffer", "head", "request_since", "active_at",
                 "busy", "paused_since", "linger", "discarded")

    def __init__(self, server):
        self.server = server
        self.transport = None
        self.buffer = bytearray()
        self.head = None  # the parsed head of a request whose body is still arriving
        self.request_since = 0.0  # when the unfinished request began; 0 when none
        self.active_at = time.monotonic()
        self.busy = False  # an asynchronous answer is being prepared
        self.paused_since = 0.0
        self.linger = None  # once the last answer is written: the timer that ends the close
        self.discarded = 0  # bytes read and dropped since then

    def connection_made(self, transport):
        self.transport = transport
        if len(self.server.connections) >= MAX_CONNECTIONS:
            return self.close_after(Unavailable("too many connections").response(close=True))
        self.server.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc):
        self.server.connections.discard(self)
        self.buffer.clear()
        if self.linger is not None:
            self.linger.cancel()

    def pause_writing(self):
        self.paused_since = time.monotonic()
        self.transport.pause_reading()

    def resume_writing(self):
        self.paused_since = 0.0
        if not self.busy:
            self.transport.resume_reading()

    def data_received(self, data):
        if self.linger is not None:  # answered for the last time: drop what still comes
            self.discarded += len(data)
            if self.discarded > LINGER_BYTES:
                self.transport.abort()
            return
        self.buffer += data
        self.active_at = time.monotonic()
        if not self.request_since:
            self.request_since = self.active_at
        if not self.busy:
            self.process()

    def process(self):
        """Answer every complete request in the buffer, in order."""
        buffer = self.buffer
        request = None
        try:
            while buffer and not self.transport.is_closing():
                request = self.head
                if request is None:
                    end = buffer.find(b"\r\n\r\n")
                    if end < 0 or end > MAX_HEADER_BYTES:
                        if end > MAX_HEADER_BYTES or len(buffer) > MAX_HEADER_BYTES + 3:
                            return self.refuse(HeadersTooLarge(f"request head over {MAX_HEADER_BYTES} bytes"))
                        return
                    try:
                        request = parse_head(bytes(buffer[:end]))
                    except HttpError as error:
                        return self.refuse(error)
                    del buffer[:end + 4]
                    self.head = request
                if len(buffer) < request.length:
                    return
                body = bytes(buffer[:request.length])
                del buffer[:request.length]
                self.head = None
                self.request_since = self.active_at if buffer else 0.0  # the next one began
                if not self.dispatch(request, body):
                    return  # an asynchronous answer will resume processing
        except Exception as error:  # the protocol's boundary: a bug costs this connection only
            self.fail(error, request.line if request else bytes(buffer[:200]).partition(b"\r\n")[0])

    def dispatch(self, request, body):
        """Answer one request; False if the answer is asynchronous (reading paused)."""
        keep = request.keep_alive and not self.server.draining
        try:
            route = ROUTES.get(request.path)
            if route is None:
                raise NotFound("no such path")
            method, handler = route
            if request.method != method:
                raise MethodNotAllowed(method)
            return handler(self, request, body, keep)
        except HttpError as error:
            return self.answer(error.response(not keep), keep and not error.closes)

    # -- endpoints: each answers now (True to go on reading) or later ------
    def post_payment(self, request, body, keep):
        cid, cents = parse_payment(body)
        self.server.pipeline.accept(cid, cents)
        return self.answer(ACCEPTED[not keep], keep)

    def get_summary(self, request, body, keep):
        return self.answer_later(self.server.summary(request), request, keep)

    def get_local_summary(self, request, body, keep):
        window = dict(parse_qsl(request.query.decode("latin-1")))
        try:
            low, high = int(window["from_ms"]), int(window["to_ms"])
        except (KeyError, ValueError):
            raise InvalidQuery("from_ms and to_ms must be integers") from None
        text = b"%d %d %d %d" % tuple(self.server.local_totals(low, high))
        return self.answer(response(b"200 OK", text, b"text/plain", close=not keep), keep)

    def post_purge(self, request, body, keep):
        return self.answer_later(self.server.purge(request), request, keep, PURGED)

    def post_local_purge(self, request, body, keep):
        if not PURGE_TOKEN or request.token != PURGE_TOKEN.encode():
            raise Forbidden("wrong or missing X-Rinha-Token")
        self.server.purge_local()
        return self.answer(PURGED[not keep], keep)

    def get_health(self, request, body, keep):
        return self.answer(response(b"200 OK", self.server.health(), close=not keep), keep)

    def answer(self, data, keep):
        if not keep:
            self.close_after(data)
            return False
        self.transport.write(data)
        return True

    def answer_later(self, work, request, keep, fixed=None):
        self.busy = True
        self.transport.pause_reading()
        task = asyncio.ensure_future(work)
        task.add_done_callback(lambda done: self.finish_later(done, request, keep, fixed))
        return False

    def finish_later(self, task, request, keep, fixed):
        self.busy = False
        if self.transport.is_closing():
            return
        error = task.exception()
        if error is None:
            data = fixed[not keep] if fixed else response(b"200 OK", task.result(), close=not keep)
        elif isinstance(error, HttpError):
            data = error.response(not keep)
            keep = keep and not error.closes
        else:  # a bug, not the client's fault
            return self.fail(error, request.line)
        if self.answer(data, keep):
            if not self.paused_since:
                self.transport.resume_reading()
            self.process()

    def refuse(self, error):
        """A framing error: answer it and close; nothing of the stream is trusted after it."""
        self.close_after(error.response(close=True))

    def fail(self, error, line):
        """A bug, not the client's fault: log it once with the request's first line and
        where it was raised, answer 500 and close this connection only."""
        frame = error.__traceback__
        while frame is not None and frame.tb_next is not None:
            frame = frame.tb_next
        where = f" at line {frame.tb_lineno} in {frame.tb_frame.f_code.co_name}" if frame else ""
        log(f"internal error{where} on {line[:200]!r}: {error!r}")
        self.close_after(response(b"500 Internal Server Error", error_body("internal error"), close=True))

    def close_after(self, data):
        """Write the last answer, then a lingering close: shut our sending side and drop
        what the client still sends (up to LINGER_BYTES, for LINGER_S) before closing, as
        closing on unread bytes would reset the connection and lose the answer."""
        transport = self.transport
        if self.linger is not None or transport.is_closing():
            return
        self.head = None
        self.buffer.clear()
        transport.write(data)
        if not transport.can_write_eof():
            return transport.close()
        transport.write_eof()
        transport.resume_reading()
        self.linger = asyncio.get_running_loop().call_later(LINGER_S, transport.abort)

    def check_deadline(self, now):
        if self.linger is not None:
            return  # its own timer ends it
        if self.request_since and now - self.request_since > READ_TIMEOUT_S and not self.busy:
            self.refuse(RequestTimeout(f"request not received within {READ_TIMEOUT_S} s"))
        elif self.paused_since and now - self.paused_since > READ_TIMEOUT_S:
            self.transport.abort()  # the client stopped reading its answers
        elif not self.request_since and not self.busy and (
                now - self.active_at > IDLE_TIMEOUT_S or self.server.draining):
            self.transport.close()


ROUTES = {  # path -> (the one method it answers, handler)
    b"/payments": (b"POST", HttpConnection.post_payment),
    b"/payments-summary": (b"GET", HttpConnection.get_summary),
    b"/purge-payments": (b"POST", HttpConnection.post_purge),
    b"/health": (b"GET", HttpConnection.get_health),
    b"/internal/summary": (b"GET", HttpConnection.get_local_summary),  # asked by peers
    b"/internal/purge": (b"POST", HttpConnection.post_local_purge),  # asked by peers
}


# ---------------------------------------------------------------------------
# Main
# Replays the journal, starts listeners, workers and pollers, then waits for SIGTERM:
# stop accepting, finish requests, drain the queue for SHUTDOWN_GRACE_S, exit. Whatever
# is still queued then stays in the journal for the next start.
# ---------------------------------------------------------------------------


async def serve():
    loop = asyncio.get_running_loop()
    ledger = Ledger()
    journal = Journal(JOURNAL_PATH)
    pending = journal.replay(ledger)
    journal.open_compacted(ledger, pending)
    pipeline = Pipeline(journal, ledger, pending)
    if pending:
        log(f"journal replayed: {len(pending)} payments requeued")
    peers = [Upstream(address, address) for address in PEERS.split(",") if address.strip()]
    server = Server(pipeline, peers)

    listeners = []
    for address in filter(None, (part.strip() for part in LISTEN.split(","))):
        if address.startswith("unix:"):
            path = address[5:]
            if os.path.exists(path):
                os.unlink(path)
            listeners.append(await loop.create_unix_server(lambda: HttpConnection(server), path, backlog=4096))
            os.chmod(path, 0o666)
        else:
            host, _, port = address.rpartition(":")
            listeners.append(await loop.create_server(
                lambda: HttpConnection(server), host or "0.0.0.0", int(port), backlog=4096, reuse_address=True))
    tasks = [asyncio.ensure_future(pipeline.worker()) for _ in range(WORKERS)]
    tasks.append(asyncio.ensure_future(pipeline.release_pins()))
    if HEALTH_INTERVAL_S > 0:
        tasks += [asyncio.ensure_future(pipeline.poll_health(p)) for p in (DEFAULT, FALLBACK)]
    def sweep():
        nonlocal sweeper
        server.sweep()
        sweeper = loop.call_later(1.0, sweep)
    sweeper = loop.call_later(1.0, sweep)

    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))

    # Everything allocated so far lives for the whole run: keep it out of every collection.
    gc.collect()
    gc.freeze()
    gc.callbacks.append(server.on_gc)
    log(f"listening on {LISTEN}; peers: {PEERS or 'none'}; queue {pipeline.queue.size} requeued")
    await stop

    log("stopping: no new connections; draining the queue")
    server.draining = True
    for listener in listeners:
        listener.close()
    server.sweep()
    deadline = loop.time() + SHUTDOWN_GRACE_S
    while (pipeline.queue.size or pipeline.in_flight) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    pipeline.running = False
    sweeper.cancel()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for upstream in (*pipeline.processors, *peers):
        upstream.close()
    left = pipeline.queue.size + pipeline.queue.taken
    log(f"stopped; {left} payments left in the journal for the next start")


def main():
    uvloop.run(serve())


if __name__ == "__main__":
    main()
