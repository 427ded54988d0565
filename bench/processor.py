#!/usr/bin/env python3
"""In-memory emulator of the Rinha de Backend 2025 payment processor.

Implements the API of CONTRACT.md section 3 (payments, service health, admin
summary and configuration), with the same delays, failures, rate limits and
rounding, on a small HTTP/1.1 server written directly on asyncio.Protocol
(uvloop and orjson when importable). Everything is kept in memory.

    python bench/processor.py --port 8001 --fee 0.05 [--host 127.0.0.1]
        [--unix PATH] [--token 123] [--base-latency-ms 0] [--health-window-s 5]

Beyond the real processor's API, fault modes for chaos tests (section "Fault
modes" below): `PUT /admin/configurations/chaos` sets per-payment probabilities
of connection resets, partial answers, stalls, 500 / 429 answers and latency
spikes (seeded, so a run can be replayed); `PUT /admin/configurations/refuse`
closes the listeners for a while; `GET /admin/chaos` reports the faults
injected so far. With no fault mode set the emulator behaves exactly as before.

--port 0 picks a free port; the actual address is printed on stderr as
`processor listening on HOST:PORT` once the server accepts connections.
SIGTERM / SIGINT stop it with exit status 0.
"""

import argparse
import asyncio
import json
import os
import random
import resource
import signal
import socket
import stat
import struct
import sys
from collections import deque
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation
from urllib.parse import unquote
from uuid import UUID

try:
    import uvloop
except ImportError:  # plain asyncio works too, only slower
    uvloop = None

try:
    import orjson

    def dumps(obj) -> bytes:
        return orjson.dumps(obj)
except ImportError:
    def dumps(obj) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------
# Limits of the real processor
# ---------------------------------------------------------------------------

MAX_IN_FLIGHT = 800       # POST /payments being processed at once
MAX_WAITING = 500         # POST /payments waiting for one of those slots
HEALTH_QUEUE = 2          # health calls allowed to wait for a later window

MAX_HEAD = 16 * 1024      # request line + headers
MAX_BODY = 1024 * 1024
PIPELINE_PAUSE = 256      # stop reading a connection with this many queued requests

MAX_FAULT_MS = 60_000     # longest stall, latency spike or refusal a fault mode may ask for
REOPEN_RETRY_S = 0.1      # retry period when a listener cannot be reopened after a refusal


# ---------------------------------------------------------------------------
# Decimal amounts and timestamps
# ---------------------------------------------------------------------------

CENT = Decimal("0.01")
DEC = Context(prec=200, traps=[InvalidOperation])   # wide enough to stay exact
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
ONE_US = timedelta(microseconds=1)


def to_cents(value: Decimal) -> Decimal:
    """Round to 2 decimals, half to even (2.675 -> 2.68, 0.125 -> 0.12)."""
    return value.quantize(CENT, rounding=ROUND_HALF_EVEN, context=DEC)


def num(value: Decimal) -> bytes:
    """A Decimal as a JSON number, never in exponent form."""
    return format(value, "f").encode()


def parse_instant(text: str):
    """ISO-8601 timestamp -> integer microseconds since the epoch (UTC), or None.

    Accepts `Z`/`z` or numeric offsets, any number of fraction digits (beyond 6
    truncated), a space instead of `T`; a timestamp without offset is UTC.
    """
    text = text.strip()
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return (moment - EPOCH) // ONE_US


def _reject_constant(name):
    raise ValueError(name)          # NaN / Infinity are not amounts


def parse_json(body: bytes):
    """JSON with floats as Decimal; None when the body is not valid JSON."""
    try:
        return json.loads(body, parse_float=Decimal, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


# ---------------------------------------------------------------------------
# Responses: (status, body, extra header lines); rendered by Connection.send
# ---------------------------------------------------------------------------

REASONS = {
    100: "Continue", 200: "OK", 204: "No Content", 400: "Bad Request",
    401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
    413: "Content Too Large", 422: "Unprocessable Entity", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented",
}
STATUS_LINES = {code: b"HTTP/1.1 %d %s\r\n" % (code, text.encode())
                for code, text in REASONS.items()}
JSON_TYPE = b"Content-Type: application/json\r\n"
TEXT_TYPE = b"Content-Type: text/plain\r\n"


def message(status: int, text: str):
    return (status, dumps({"message": text}), JSON_TYPE)


PAID = message(200, "payment processed successfully")
PURGED = message(200, "All payments purged.")
BAD_REQUEST = message(400, "invalid request")
UNAUTHORIZED = message(401, "invalid or missing X-Rinha-Token")
NOT_FOUND = message(404, "not found")
NOT_ALLOWED = message(405, "method not allowed")
DUPLICATE = message(422, "Payment could not be processed. CorrelationId already exists.")
OVERLOADED = message(429, "too many requests in flight")
FAILED = message(500, "simulated failure")
NO_CONTENT = (204, b"", b"")


# ---------------------------------------------------------------------------
# The processor: state and endpoint handlers
#
# A handler returns a response tuple, or a coroutine that yields one when the
# request has to wait (delay, latency, queues).
# ---------------------------------------------------------------------------

class Processor:
    def __init__(self, fee: Decimal, token: str, base_latency_ms: float,
                 health_window_s: float):
        self.fee = fee
        self.token = token
        self.base_latency = base_latency_ms / 1000.0
        self.delay_ms = 0
        self.failing = False
        # correlationId (canonical UUID text) -> (requestedAt in us, amount, requestedAt text)
        self.payments = {}
        # concurrency limit of POST /payments: a slot is handed straight to the
        # oldest waiter when released, so waiters exist only while all are taken
        self.in_flight = 0
        self.waiting = deque()
        # health: 1 call per fixed window (counted from start), 2 may queue;
        # each new window serves the oldest queued call first
        self.loop = asyncio.get_running_loop()
        self.window = health_window_s
        self.origin = self.loop.time()
        self.window_index = 0
        self.window_used = False
        self.health_queue = deque()
        self.health_timer = None
        self.retry_after = b"Retry-After: %d\r\n" % max(1, round(health_window_s))
        # fault modes (None: none set) and what serve() gives for refusals
        self.chaos = None
        self.fault_counts = dict.fromkeys(FAULT_COUNTERS, 0)
        self.connections = set()
        self.servers = []
        self.listen = None        # coroutine function (re)opening the listeners
        self.refusing = False

    # -- routing -------------------------------------------------------------

    def dispatch(self, method: str, path: str, query: str, headers: dict, body: bytes):
        if path == "/payments":
            return self.post_payment(body) if method == "POST" else NOT_ALLOWED
        if path == "/payments/service-health":
            return self.service_health() if method == "GET" else NOT_ALLOWED
        if path.startswith("/payments/"):
            return self.get_payment(path[10:]) if method == "GET" else NOT_ALLOWED
        admin = ADMIN_ROUTES.get(path)
        if admin is None:
            return NOT_FOUND
        wanted, handler = admin
        if method != wanted:
            return NOT_ALLOWED
        if headers.get("x-rinha-token") != self.token:
            return UNAUTHORIZED
        return handler(self, query, body)

    # -- POST /payments --------------------------------------------------------

    def post_payment(self, body: bytes):
        doc = parse_json(body)
        if type(doc) is not dict:
            return BAD_REQUEST
        cid, amount, requested_at = (doc.get("correlationId"), doc.get("amount"),
                                     doc.get("requestedAt"))
        if type(cid) is not str or type(requested_at) is not str:
            return BAD_REQUEST
        try:
            key = str(UUID(cid))
        except ValueError:
            return BAD_REQUEST
        if type(amount) is int:
            amount = Decimal(amount)
        elif type(amount) is not Decimal:
            return BAD_REQUEST
        try:
            amount = to_cents(amount)
        except InvalidOperation:
            return BAD_REQUEST
        instant = parse_instant(requested_at)
        if instant is None:
            return BAD_REQUEST
        record = (instant, amount, requested_at)
        if self.chaos is not None:
            return self.chaotic_payment(key, record)
        return self.admit(key, record)

    def admit(self, key, record):
        """The real processor's path for a valid payment: slots, delay, failure, insert."""
        if self.in_flight < MAX_IN_FLIGHT:
            if not self.delay_ms and not self.base_latency:
                return self.store(key, record) if not self.failing else FAILED
            self.in_flight += 1
            return self.process_payment(key, record, None)
        if len(self.waiting) < MAX_WAITING:
            slot = self.loop.create_future()
            self.waiting.append(slot)
            return self.process_payment(key, record, slot)
        return OVERLOADED

    async def process_payment(self, key, record, slot):
        if slot is not None:
            await slot                          # the slot of a finished request
        try:
            if self.delay_ms > 0:               # the delay comes first...
                await asyncio.sleep(self.delay_ms / 1000.0)
            if self.failing:                    # ...then the failure, storing nothing
                return FAILED
            if self.base_latency:               # the database insert
                await asyncio.sleep(self.base_latency)
            return self.store(key, record)
        finally:
            self.release_slot()

    def release_slot(self):
        while self.waiting:
            slot = self.waiting.popleft()
            if not slot.done():
                slot.set_result(None)           # the slot changes hands
                return
        self.in_flight -= 1

    def store(self, key, record):
        # check and insert without an await in between: one winner per id
        if key in self.payments:
            return DUPLICATE
        self.payments[key] = record
        return PAID

    # -- GET /payments/{id} ------------------------------------------------------

    def get_payment(self, raw_id: str):
        try:
            key = str(UUID(unquote(raw_id)))
        except ValueError:
            return BAD_REQUEST if raw_id else NOT_FOUND
        record = self.payments.get(key)
        if record is None:
            return NOT_FOUND
        _, amount, requested_at = record
        body = b'{"correlationId":%s,"amount":%s,"requestedAt":%s}' % (
            dumps(key), num(amount), dumps(requested_at))
        return (200, body, JSON_TYPE)

    # -- GET /payments/service-health --------------------------------------------

    def service_health(self):
        index = int((self.loop.time() - self.origin) // self.window)
        if index > self.window_index:
            self.window_index, self.window_used = index, False
        if not self.window_used and not self.health_queue:
            self.window_used = True
            return self.health_answer()
        if len(self.health_queue) >= HEALTH_QUEUE:
            return (429, b"Too many health checks. Try again later.",
                    TEXT_TYPE + self.retry_after)
        turn = self.loop.create_future()
        self.health_queue.append(turn)
        if self.health_timer is None:
            self.arm_health_timer(self.window_index + 1)
        return self.wait_health(turn)

    def arm_health_timer(self, index):
        at = self.origin + index * self.window
        self.health_timer = self.loop.call_at(at, self.next_health_window, index)

    def next_health_window(self, index):
        self.health_timer = None
        if index >= self.window_index:          # (a late timer keeps the newer window)
            self.window_index, self.window_used = index, False
        while self.health_queue and not self.window_used:
            turn = self.health_queue.popleft()
            if not turn.done():                 # the oldest waiter takes this window
                turn.set_result(None)
                self.window_used = True
        if self.health_queue:
            self.arm_health_timer(self.window_index + 1)

    async def wait_health(self, turn):
        await turn
        return self.health_answer()

    def health_answer(self):
        return (200, dumps({"failing": self.failing, "minResponseTime": self.delay_ms}),
                JSON_TYPE)

    # -- admin endpoints (token already checked) -----------------------------------

    def summary(self, query: str, body: bytes):
        bounds = {}
        for part in query.split("&"):
            name, _, value = part.partition("=")
            if name in ("from", "to") and value:
                instant = parse_instant(unquote(value))
                if instant is None:
                    return BAD_REQUEST
                bounds[name] = instant
        low, high = bounds.get("from"), bounds.get("to")
        if low is None or high is None:   # the real query: a missing bound -> everything
            chosen = [amount for _, amount, _ in self.payments.values()]
        else:
            chosen = [amount for instant, amount, _ in self.payments.values()
                      if low <= instant <= high]
        total = DEC.create_decimal("0.00")
        for amount in chosen:
            total = DEC.add(total, amount)
        fee_total = to_cents(DEC.multiply(total, self.fee))
        body = (b'{"totalRequests":%d,"totalAmount":%s,"totalFee":%s,"feePerTransaction":%s}'
                % (len(chosen), num(total), num(fee_total), num(self.fee)))
        return (200, body, JSON_TYPE)

    def set_token(self, query: str, body: bytes):
        doc = parse_json(body)
        if type(doc) is not dict or type(doc.get("token")) is not str:
            return BAD_REQUEST
        self.token = doc["token"]
        return NO_CONTENT

    def set_delay(self, query: str, body: bytes):
        doc = parse_json(body)
        delay = doc.get("delay") if type(doc) is dict else None
        if type(delay) is not int or not 0 <= delay <= 2**31 - 1:
            return BAD_REQUEST
        was, self.delay_ms = self.delay_ms, delay
        return (200, dumps({"config": "delay", "was": was, "is": delay}), JSON_TYPE)

    def set_failure(self, query: str, body: bytes):
        doc = parse_json(body)
        failure = doc.get("failure") if type(doc) is dict else None
        if type(failure) is not bool:
            return BAD_REQUEST
        was, self.failing = self.failing, failure
        return (200, dumps({"config": "failure", "was": was, "is": failure}), JSON_TYPE)

    def purge(self, query: str, body: bytes):
        self.payments.clear()
        return PURGED

    # -- fault modes (not in the real processor) -------------------------------------

    def set_chaos(self, query: str, body: bytes):
        doc = parse_json(body)
        if type(doc) is not dict:
            return BAD_REQUEST
        try:
            chaos = Chaos(doc) if doc else None
        except ValueError as error:
            return message(400, str(error))
        was = self.chaos.settings if self.chaos is not None else {}
        self.chaos = chaos
        return (200, dumps({"config": "chaos", "was": was,
                            "is": chaos.settings if chaos is not None else {}}), JSON_TYPE)

    def chaos_report(self, query: str, body: bytes):
        return (200, dumps({"chaos": self.chaos.settings if self.chaos is not None else {},
                            "refusing": self.refusing, "faults": self.fault_counts}), JSON_TYPE)

    def set_refuse(self, query: str, body: bytes):
        doc = parse_json(body)
        ms = doc.get("ms") if type(doc) is dict else None
        if type(ms) is not int or not 0 < ms <= MAX_FAULT_MS:
            return message(400, f"ms must be an integer in 1..{MAX_FAULT_MS}")
        if self.listen is None:
            return message(400, "no listener to close")
        if self.refusing:
            return message(409, "already refusing connections")
        self.refusing = True
        self.fault_counts["refusals"] += 1
        # after this answer is written: its connection is closed with the others
        self.loop.call_soon(self.start_refusing, ms / 1000.0)
        return (200, dumps({"config": "refuse", "ms": ms}), JSON_TYPE)

    def start_refusing(self, seconds):
        """Close the listeners (new connections are refused) and every open connection
        (a payment being processed still completes, its answer is lost), then reopen."""
        for server in self.servers:
            server.close()
        self.servers = []
        for connection in list(self.connections):
            connection.closed = True
            connection.transport.close()
        self.loop.call_later(seconds, lambda: self.loop.create_task(self.reopen()))

    async def reopen(self):
        while True:
            try:
                self.servers = await self.listen()
                break
            except OSError as error:
                print(f"processor: cannot reopen the listener yet: {error}", file=sys.stderr)
                await asyncio.sleep(REOPEN_RETRY_S)
        self.refusing = False

    async def chaotic_payment(self, key, record):
        """A valid payment under the fault modes: at most one fault, plus maybe a spike."""
        chaos, counts = self.chaos, self.fault_counts
        fault, spike, detail = chaos.draw()
        if spike:
            counts["spike"] += 1
            await asyncio.sleep(chaos.spike_ms / 1000.0)
        if fault is not None:
            counts[fault] += 1
        if fault == "reset_before":
            return Fault("reset")
        if fault == "error_500":
            return FAILED
        if fault == "error_429":
            return OVERLOADED
        result = self.admit(key, record)
        if type(result) is not tuple:
            result = await result
        if fault == "reset_after":
            return Fault("reset")
        if fault == "partial":
            return Fault("headers" if detail < 0.5 else "half", result)
        if fault == "stall":
            await asyncio.sleep(chaos.stall_ms / 1000.0)
            if detail < chaos.stall_close:
                return Fault("close")
        return result


# ---------------------------------------------------------------------------
# Fault modes
#
# PUT /admin/configurations/chaos with a JSON object sets them all at once
# (keys not given are 0; `{}` clears every mode):
#   reset_before  reset the connection (RST) without storing the payment
#   error_500     answer 500 without storing it
#   error_429     answer 429 without storing it
#   reset_after   store the payment, then reset the connection (the answer is lost)
#   partial       store it, then write only the headers or the headers and half
#                 the body of the answer, and close
#   stall         store it, wait stall_ms, then close without a byte (with
#                 probability stall_close) or answer
#   spike         wait spike_ms more before processing (drawn independently)
# Each is a probability 0..1 per valid POST /payments; the first six exclude
# each other (their sum is at most 1). stall_ms and spike_ms default to 1000 and
# 500, stall_close to 0.5; seed (an integer, default 0) seeds the generator: the
# same seed and the same sequence of payments give the same faults.
# ---------------------------------------------------------------------------

EXCLUSIVE_FAULTS = ("reset_before", "error_500", "error_429", "reset_after", "partial", "stall")
FAULT_COUNTERS = EXCLUSIVE_FAULTS + ("spike", "refusals")
CHAOS_DEFAULTS = {"stall_ms": 1000, "spike_ms": 500, "stall_close": 0.5, "seed": 0}


class Fault:
    """An answer to POST /payments that breaks the connection: "reset" (RST),
    "close" (FIN, nothing written), "headers" or "half" (that much of `response`, then FIN)."""

    __slots__ = ("kind", "response")

    def __init__(self, kind, response=None):
        self.kind, self.response = kind, response


def probability(doc, name):
    value = doc.get(name, 0)
    if type(value) not in (int, float, Decimal) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in 0..1")
    return float(value)


class Chaos:
    """Validated fault settings and their seeded generator."""

    def __init__(self, doc: dict):
        unknown = set(doc) - set(EXCLUSIVE_FAULTS) - {"spike"} - set(CHAOS_DEFAULTS)
        if unknown:
            raise ValueError("unknown fault mode(s): " + ", ".join(sorted(unknown)))
        self.chances = [(name, probability(doc, name)) for name in EXCLUSIVE_FAULTS]
        if sum(chance for _, chance in self.chances) > 1 + 1e-9:
            raise ValueError("the probabilities of " + ", ".join(EXCLUSIVE_FAULTS)
                             + " add up to more than 1")
        self.spike = probability(doc, "spike")
        self.stall_close = probability({**CHAOS_DEFAULTS, **doc}, "stall_close")
        for name in ("stall_ms", "spike_ms", "seed"):
            value = doc.get(name, CHAOS_DEFAULTS[name])
            if type(value) is not int or value < 0 or name != "seed" and value > MAX_FAULT_MS:
                raise ValueError(f"{name} must be an integer in 0..{MAX_FAULT_MS}"
                                 if name != "seed" else "seed must be a non-negative integer")
            setattr(self, name, value)
        self.random = random.Random(self.seed)
        self.settings = {**{name: chance for name, chance in self.chances}, "spike": self.spike,
                         "stall_ms": self.stall_ms, "spike_ms": self.spike_ms,
                         "stall_close": self.stall_close, "seed": self.seed}

    def draw(self):
        """-> (fault name or None, spike?, a number in [0, 1) for the fault's details)."""
        roll, spike, detail = self.random.random(), self.random.random(), self.random.random()
        fault = None
        for name, chance in self.chances:
            if roll < chance:
                fault = name
                break
            roll -= chance
        return fault, spike < self.spike, detail


ADMIN_ROUTES = {
    "/admin/payments-summary": ("GET", Processor.summary),
    "/admin/configurations/token": ("PUT", Processor.set_token),
    "/admin/configurations/delay": ("PUT", Processor.set_delay),
    "/admin/configurations/failure": ("PUT", Processor.set_failure),
    "/admin/purge-payments": ("POST", Processor.purge),
    "/admin/configurations/chaos": ("PUT", Processor.set_chaos),
    "/admin/configurations/refuse": ("PUT", Processor.set_refuse),
    "/admin/chaos": ("GET", Processor.chaos_report),
}


# ---------------------------------------------------------------------------
# HTTP/1.1 connection: incremental parsing, keep-alive, pipelining in order
# ---------------------------------------------------------------------------

CLOSE = b"Connection: close\r\n"
KEEP_ALIVE = b"Connection: keep-alive\r\n"


class Connection(asyncio.Protocol):
    def __init__(self, processor: Processor):
        self.processor = processor
        self.transport = None
        self.buffer = bytearray()
        self.head = None          # parsed head of the request whose body is awaited
        self.queued = deque()     # requests waiting behind a slow one
        self.busy = False         # a coroutine handler is running
        self.closed = False
        self.paused = False
        self.half_closed = False  # the client sent EOF; close once all is answered

    def connection_made(self, transport):
        self.transport = transport
        self.processor.connections.add(self)

    def connection_lost(self, exc):
        self.closed = True
        self.processor.connections.discard(self)

    def eof_received(self):
        if self.busy:                 # keep the socket open to write the answers
            self.half_closed = True
            return True
        return False                  # nothing pending: close now

    def data_received(self, data):
        buffer = self.buffer
        buffer += data
        while not self.closed:
            if self.head is None:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > MAX_HEAD:
                        self.reject(431)
                    return
                head = self.parse_head(bytes(buffer[:end]))
                del buffer[:end + 4]
                if head is None:
                    return
                self.head = head
                if head[5] and len(buffer) < head[4]:
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            length = self.head[4]
            if len(buffer) < length:
                return
            method, path, query, headers, _, _, connection = self.head
            body = bytes(buffer[:length])
            del buffer[:length]
            self.head = None
            self.submit((method, path, query, headers, body, connection))

    def parse_head(self, raw: bytes):
        """-> (method, path, query, headers, length, expect_100, connection header) or None."""
        lines = raw.decode("latin-1").split("\r\n")
        request_line = lines[0].split(" ")
        if len(request_line) != 3 or not request_line[2].startswith("HTTP/1."):
            return self.reject(400)
        method, target, version = request_line
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                return self.reject(400)
            headers[name.strip().lower()] = value.strip()
        if "transfer-encoding" in headers:
            return self.reject(501)             # Content-Length bodies only
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            return self.reject(400)
        if length < 0:
            return self.reject(400)
        if length > MAX_BODY:
            return self.reject(413)
        tokens = headers.get("connection", "").lower()
        if version == "HTTP/1.0":
            connection = KEEP_ALIVE if "keep-alive" in tokens else CLOSE
        else:
            connection = CLOSE if "close" in tokens else b""
        path, _, query = target.partition("?")
        expect = headers.get("expect", "").lower() == "100-continue"
        return (method, path, query, headers, length, expect, connection)

    def reject(self, status):
        """Malformed request: answer and close (the stream can't be resynchronised)."""
        if self.busy:
            self.queued.append(message(status, REASONS[status]))
        else:
            self.send(message(status, REASONS[status]), CLOSE)
        self.closed = True
        return None

    def submit(self, request):
        if self.busy:
            self.queued.append(request)
            if len(self.queued) >= PIPELINE_PAUSE and not self.paused:
                self.paused = True
                self.transport.pause_reading()
            return
        result = self.processor.dispatch(*request[:5])
        if type(result) is tuple:
            self.send(result, request[5])
        else:
            self.busy = True
            self.processor.loop.create_task(self.run_slow(result, request[5]))

    async def run_slow(self, pending, connection):
        """Answer one slow request, then the pipelined ones behind it, in order."""
        try:
            response = await pending
            while self.send(response, connection) and self.queued:
                request = self.queued.popleft()
                if type(request[0]) is int:     # a parse error queued by reject()
                    self.send(request, CLOSE)
                    return
                connection = request[5]
                response = self.processor.dispatch(*request[:5])
                if type(response) is not tuple:
                    response = await response
        finally:
            self.busy = False
            if self.half_closed and not self.closed:
                self.closed = True
                self.transport.close()
            if self.paused and not self.closed:
                self.paused = False
                self.transport.resume_reading()

    def send(self, response, connection) -> bool:
        """Write one response; False when the connection is (now) closed."""
        if self.transport.is_closing():
            return False
        if type(response) is Fault:
            return self.break_off(response, connection)
        self.transport.write(render(response, connection))
        if connection is CLOSE:
            self.closed = True
            self.transport.close()
            return False
        return True

    def break_off(self, fault, connection) -> bool:
        """Apply a fault mode to this connection; always ends it (False)."""
        self.closed = True
        if fault.kind == "reset":
            sock = self.transport.get_extra_info("socket")
            if sock is not None and sock.family != socket.AF_UNIX:
                # linger 0: close() sends RST instead of FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()
            return False
        if fault.kind in ("headers", "half"):
            status, body, extra = fault.response
            data = render(fault.response, connection)
            head = len(data) - len(body)
            self.transport.write(data[:head + (len(body) // 2 if fault.kind == "half" else 0)])
        self.transport.close()
        return False


def render(response, connection) -> bytes:
    status, body, extra = response
    if status == 204:
        head = STATUS_LINES[204] + extra + connection + b"\r\n"
    else:
        head = b"%s%s%sContent-Length: %d\r\n\r\n" % (
            STATUS_LINES[status], extra, connection, len(body))
    return head + body


# ---------------------------------------------------------------------------
# Command line and main loop
# ---------------------------------------------------------------------------

def decimal_arg(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        raise ValueError(text) from None


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=None,
                        help="TCP port (0 = any free port); default 8080 unless --unix is given")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--unix", default=None, help="also/instead listen on this unix socket")
    parser.add_argument("--fee", type=decimal_arg, default=Decimal("0.05"),
                        help="fee per transaction, e.g. 0.05 (default) or 0.15")
    parser.add_argument("--token", default="123", help="initial X-Rinha-Token")
    parser.add_argument("--base-latency-ms", type=float, default=0.0,
                        help="latency of the simulated database insert of each payment")
    parser.add_argument("--health-window-s", type=float, default=5.0,
                        help="rate-limit window of /payments/service-health")
    args = parser.parse_args(argv)
    if args.port is None and args.unix is None:
        args.port = 8080
    if args.health_window_s <= 0 or args.base_latency_ms < 0:
        parser.error("--health-window-s must be > 0 and --base-latency-ms >= 0")
    return args


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1 << 16), hard))
        except (ValueError, OSError):
            pass


async def serve(args):
    loop = asyncio.get_running_loop()
    processor = Processor(args.fee, args.token, args.base_latency_ms, args.health_window_s)
    names = []
    port = args.port

    async def listen():
        """Open the listeners (at start, and again after a refusal: same port)."""
        nonlocal port
        servers = []
        if port is not None:
            server = await loop.create_server(lambda: Connection(processor), args.host,
                                              port, backlog=4096, reuse_address=True)
            port = server.sockets[0].getsockname()[1]
            servers.append(server)
        if args.unix is not None:
            try:
                if stat.S_ISSOCK(os.stat(args.unix).st_mode):
                    os.unlink(args.unix)            # stale socket of a previous run
            except FileNotFoundError:
                pass
            server = await loop.create_unix_server(lambda: Connection(processor), args.unix,
                                                   backlog=4096)
            os.chmod(args.unix, 0o666)
            servers.append(server)
        return servers

    processor.servers = await listen()
    processor.listen = listen
    if port is not None:
        names.append(f"{args.host}:{port}")
    if args.unix is not None:
        names.append(f"unix:{args.unix}")

    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print("processor listening on " + ", ".join(names), file=sys.stderr, flush=True)
    await stop.wait()
    for server in processor.servers:
        server.close()
    if args.unix is not None:
        try:
            os.unlink(args.unix)
        except OSError:
            pass


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    raise_fd_limit()
    if uvloop is not None:
        uvloop.run(serve(args))
    else:
        asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
