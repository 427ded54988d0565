#!/usr/bin/env python3
"""rinha: a payment intermediary for the Rinha de Backend 2025, in one file.

Clients POST /payments; it journals the payment, answers 202 at once and forwards it to the default processor (to the
fallback only when waiting costs more). GET /payments-summary: exactly what the processors confirmed, backend-wide.

Where to start: read the sections in order; each is a step of a payment's path.
  1. Configuration     every setting, read once from the environment.
  2. Wire formats      a payment's time (ms) and amount (cents), to and from text.
  3. HTTP parsing      parse_head, then parse_payment: a request becomes (cid, cents) or a 4xx.
  4. Ledger, journal   Journal.append writes the A record before the 202; a confirmation ends as a C record and a
                       Ledger entry (RECORDS: every record kind).
  5. Queue             Payment and Backlog: where an accepted payment waits, in one place.
  6. Processor client  Upstream.request: the keep-alive HTTP client that carries it.
  7. Router, breaker   Pipeline.accept -> pump -> route -> attempt -> send -> settle: its whole life, decided by
                       PAYMENT_TRANSITIONS and BREAKER_TRANSITIONS.
  8. Replication       how its confirmation reaches the other instances.
  9. Server            HttpConnection.post_payment (where it arrives) calls steps 3-7; get_summary answers for all.
 10. Main              start-up (replay the journal), the tick, a graceful stop.
"""
import array
import asyncio
import bisect
import ctypes
import errno
import gc
import itertools
import math
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Decimal
from urllib.parse import parse_qsl

import orjson
import uvloop


# ---- Configuration --------------------------------------------------------
# Every setting is a field of one frozen Config, read once from the environment (Config.from_env: the field's name
# in capitals) and passed to what uses it. README.md's configuration table says what each one means.
@dataclass(frozen=True, slots=True)
class Config:
    instance_id: str = "api"
    listen: str = "0.0.0.0:8080"
    peers: str = ""
    default_processor_url: str = "http://payment-processor-default:8080"
    fallback_processor_url: str = "http://payment-processor-fallback:8080"
    journal_path: str = "./api.journal"  # from_env: ./{INSTANCE_ID}.journal
    journal_fsync: int = 0
    journal_reserve_bytes: int = 1 << 20
    journal_retry_s: float = 0.5
    journal_compact_bytes: int = 16 << 20
    journal_compact_slice: int = 2000
    history_retention_s: float = 0.0  # 0: keep every confirmed payment
    purge_token: str = ""
    queue_capacity: int = 100_000
    remembered_ids: int = 200_000
    in_flight_min: int = 4
    in_flight_cap: int = 650
    forward_rate: float = 2000.0
    forward_batch_s: float = 0.05
    latency_weight: float = 0.2
    processor_timeout_s: float = 10.0
    breaker_failures: int = 3
    breaker_retry_s: float = 0.25
    fallback_after_s: float = 25.0
    fallback_queue_fraction: float = 0.8
    promise_margin_s: float = 1.5
    promise_headroom_s: float = 0.25
    promise_hold_s: float = 1.0
    suspect_min_s: float = 0.1
    probe_interval_s: float = 0.25
    pin_settle_s: float = 30.0
    pin_check_interval_s: float = 1.0
    health_interval_s: float = 10.0
    peer_timeout_s: float = 2.0
    peer_summary_timeout_s: float = 0.25
    summary_wait_s: float = 1.0
    tick_s: float = 0.1
    stall_s: float = 0.8
    replica_interval_s: float = 0.25
    replica_heartbeat_s: float = 1.0
    replica_batch: int = 500
    replica_ready_max_s: float = 3.0
    shutdown_grace_s: float = 10.0
    max_header_bytes: int = 8192
    max_body_bytes: int = 16384
    max_connections: int = 2048
    read_timeout_s: float = 10.0
    idle_timeout_s: float = 600.0
    linger_s: float = 2.0
    linger_bytes: int = 4 << 20
    max_amount: Decimal = Decimal("1000000000")

    @classmethod
    def from_env(cls, environ=os.environ):
        """The defaults, overridden by each NAME set in the environment; SystemExit if one is malformed."""
        values = {}
        for field in fields(cls):
            text = environ.get(field.name.upper())
            if text is not None:
                try:
                    values[field.name] = type(field.default)(text)
                except (ValueError, ArithmeticError):
                    raise SystemExit(f"{field.name.upper()}={text!r}: not a valid {type(field.default).__name__}")
        config = cls(**values)
        return config if "journal_path" in values else replace(config, journal_path=f"./{config.instance_id}.journal")


DEFAULT, FALLBACK = 0, 1
PROCESSOR_NAMES = ("default", "fallback")
LOG = threading.local()  # per thread (tests run instances in-process): serve() sets .name, a test may set .stream


def log(message):
    stream = getattr(LOG, "stream", sys.stderr)
    stream.write(f"{iso_ms(now_ms()).decode()} {getattr(LOG, 'name', '-')} {message}\n")
    stream.flush()


# ---- Wire formats ---------------------------------------------------------
# Timestamps are integer milliseconds since the epoch; amounts are integer cents. Converting to and from text
# happens only here, exactly and the same way both ways.
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
UUID_PATTERN = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
UUID_BYTES = re.compile(UUID_PATTERN.pattern.encode())
_second_text = (-1, b"")  # cache of the formatted second; one tuple, replaced whole (thread-safe)


def now_ms():
    return time.time_ns() // 1_000_000


def iso_ms(ms):
    """1752150896789 -> b'2025-07-10T12:34:56.789Z' (JavaScript's toISOString form)."""
    second, milli = divmod(ms, 1000)
    global _second_text
    cached = _second_text
    if second != cached[0]:
        cached = _second_text = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode()
    return b"%s.%03dZ" % (cached[1], milli)


def parse_iso_ms(text, round_up):
    """ISO-8601 (Z, offset, or naive = UTC) -> ms; sub-ms rounds inward (up for `from`, down for `to`): inclusive."""
    stamp = datetime.fromisoformat(text)  # ValueError on anything else
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    micros = (stamp - EPOCH) // timedelta(microseconds=1)
    return -(-micros // 1000) if round_up else micros // 1000


def amount_to_cents(value):
    """A JSON number -> cents, rounded half to even as the processors store amounts; None if not finite. Exact at any
    magnitude: it reads the float's shortest repr (<= 17 digits, within Decimal's precision)."""
    if type(value) is int:
        return value * 100
    if type(value) is not float or not math.isfinite(value):
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
    connection = b"Connection: close\r\n" if close else b""
    kind = b"Content-Type: %s\r\n" % content_type if body else b""
    return b"HTTP/1.1 %s\r\n%s%s%sContent-Length: %d\r\n\r\n%s" % (status, kind, extra, connection, len(body), body)


ACCEPTED = (response(b"202 Accepted"), response(b"202 Accepted", close=True))
PURGED = (response(b"200 OK", b'{"message":"purged"}'), response(b"200 OK", b'{"message":"purged"}', close=True))
SUMMARY_BODY = (b'{"default":{"totalRequests":%d,"totalAmount":%s},'
                b'"fallback":{"totalRequests":%d,"totalAmount":%s}}')
PROCESSOR_BODY = b'{"correlationId":"%s","amount":%s,"requestedAt":"%s"}'
JSON_HEADER = b"Content-Type: application/json\r\n"


# ---- HTTP parsing ---------------------------------------------------------
# Turns a request head into its parts or a named error; never reads past what it was given. Framing errors (the
# stream can't be trusted afterwards) close the connection.
class HttpError(Exception):
    """A refused request: status, message, `closes` (the stream can no longer be trusted), `extra` header lines."""
    status, closes, extra = b"400 Bad Request", True, b""

    def __init__(self, message, field=None, extra=None):
        super().__init__(message)
        self.message, self.field = message, field
        if extra is not None:
            self.extra = extra

    def response(self, close):
        body = {"error": self.message, "field": self.field} if self.field else {"error": self.message}
        return response(self.status, orjson.dumps(body), extra=self.extra, close=close or self.closes)


# One class per distinct answer, one line each.
class MalformedRequest(HttpError): status = b"400 Bad Request"
class HeadersTooLarge(HttpError): status = b"431 Request Header Fields Too Large"
class BodyTooLarge(HttpError): status = b"413 Content Too Large"
class LengthRequired(HttpError): status = b"411 Length Required"
class TransferEncodingNotSupported(HttpError): status = b"501 Not Implemented"
class VersionNotSupported(HttpError): status = b"505 HTTP Version Not Supported"
class RequestTimeout(HttpError): status = b"408 Request Timeout"
class InvalidRequest(HttpError): status, closes = b"400 Bad Request", False  # a bad body or query
class NotFound(HttpError): status, closes = b"404 Not Found", False
class Forbidden(HttpError): status, closes = b"403 Forbidden", False
class HistoryDropped(HttpError): status, closes = b"410 Gone", False  # before HISTORY_RETENTION_S
class Unavailable(HttpError): status, closes = b"503 Service Unavailable", False
class PeerUnavailable(HttpError): status, closes = b"502 Bad Gateway", False
class InternalError(HttpError): status = b"500 Internal Server Error"  # a bug, not the client's fault
class MethodNotAllowed(HttpError): status, closes = b"405 Method Not Allowed", False  # extra: its Allow line
# A full queue, a full disk, a stalled instance: nothing was taken.
class RetryLater(HttpError): status, closes, extra = b"503 Service Unavailable", False, b"Retry-After: 1\r\n"


class Request:
    __slots__ = ("line", "method", "path", "query", "keep_alive", "length", "token")

    def __init__(self, line, method, path, query, keep_alive, length, token):
        self.line, self.method, self.path, self.query = line, method, path, query
        self.keep_alive, self.length, self.token = keep_alive, length, token


def parse_head(head, max_body_bytes):
    """Request line and headers (without the final CRLFCRLF) -> Request, or an HttpError."""
    lines = head.split(b"\r\n")
    if head.count(b"\n") != len(lines) - 1 or head.count(b"\r") != len(lines) - 1:
        raise MalformedRequest("bare CR or LF in the request head")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1].startswith(b"/"):
        raise MalformedRequest("malformed request line")
    method, target, version = parts
    if version != b"HTTP/1.1" and version != b"HTTP/1.0":
        if version.startswith(b"HTTP/"):
            raise VersionNotSupported("only HTTP/1.0 and HTTP/1.1 are supported")
        raise MalformedRequest("malformed request line")
    keep_alive = version == b"HTTP/1.1"
    length, chunked, token = None, False, b""
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise MalformedRequest("malformed header line")
        name, value = name.lower(), value.strip()
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
            keep_alive = b"close" not in options and (keep_alive or b"keep-alive" in options)
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
    if length > max_body_bytes:
        raise BodyTooLarge(f"body over {max_body_bytes} bytes")
    path, _, query = target.partition(b"?")
    return Request(lines[0], method, path, query, keep_alive, length, token)


def parse_payment(body, max_cents):
    """POST /payments body -> (correlationId, cents), or InvalidRequest naming the field."""
    try:
        payment = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest("body is not valid JSON") from None
    if type(payment) is not dict:
        raise InvalidRequest("body must be a JSON object")
    cid = payment.get("correlationId")
    if type(cid) is not str or len(cid) != 36 or not UUID_PATTERN.fullmatch(cid):
        raise InvalidRequest("correlationId must be a UUID string", "correlationId")
    cents = amount_to_cents(payment.get("amount"))
    if cents is None or cents <= 0 or cents > max_cents:
        raise InvalidRequest(f"amount must be a number over 0.00 and at most {cents_text(max_cents).decode()}",
                             "amount")
    return cid.encode(), cents


def parse_window(query):
    """from/to query parameters -> inclusive (from_ms, to_ms); absent bounds are open."""
    bounds = {"from": -(1 << 62), "to": 1 << 62}
    try:
        pairs = parse_qsl(query.decode("latin-1"))
    except ValueError:
        raise InvalidRequest("malformed query string") from None
    for name, value in pairs:
        if name in bounds and value:
            try:  # a '+' offset arrives as a space once the query is decoded
                bounds[name] = parse_iso_ms(value.replace(" ", "+"), round_up=(name == "from"))
            except ValueError:
                raise InvalidRequest(f"{name} must be an ISO-8601 timestamp", name) from None
    return bounds["from"], bounds["to"]


# ---- Ledger and journal ---------------------------------------------------
# The ledger holds confirmed payments only, in files and flat arrays the garbage collector never walks. The journal is
# written before every answer and every send; replaying it rebuilds the queue and mends the ledger's last entries.
class Ledger:
    """Confirmed payments of one instance (its own, or a peer's replica), in files path + suffix (DESIGN.md, The
    ledger): .log, every confirmation in order (LOG_ENTRY); .0/.1, each processor's frozen history by requestedAt
    (FROZEN_ENTRY); .checkpoint. The tail, in memory, holds what is not below `safe` yet. Retention frees disk blocks,
    never moves an index; a window starting before `kept_from` (the oldest time still whole) is refused."""
    __slots__ = ("path", "fsync", "epoch", "log_fd", "logged", "unwritten", "sorted_fds", "frozen", "frozen_ms",
                 "frozen_cents", "kept", "kept_from", "base", "tail", "safe", "saved")

    def __init__(self, path, fsync=False):
        self.path, self.fsync = path, fsync
        self.log_fd = os.open(path + ".log", os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        self.sorted_fds = tuple(os.open(f"{path}.{p}", os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644) for p in (0, 1))
        try:
            with open(path + ".checkpoint", "rb") as file:
                head, _, tail = file.read().partition(b"\n")
            self.epoch, self.saved, *numbers, self.kept_from, self.base = map(int, head.split())
            pairs = [numbers[i:i + 2] for i in range(0, 10, 2)]
            self.frozen, self.frozen_ms, self.frozen_cents, self.kept, sizes = pairs
        except FileNotFoundError:
            self.start(0)
            tail, sizes = b"", (0, 0)
        self.safe = list(self.frozen_ms)
        data, at = array.array("q", tail), 2 * sizes[0]  # per processor: (times, cents), sorted by time
        self.tail = ((data[:sizes[0]], data[sizes[0]:at]), (data[at:at + sizes[1]], data[at + sizes[1]:]))
        for p, fd in enumerate(self.sorted_fds):  # a freeze cut short: records past the checkpoint's
            os.ftruncate(fd, 16 * self.frozen[p])
        size = os.fstat(self.log_fd).st_size
        os.ftruncate(self.log_fd, size - size % 24)  # a torn last entry
        self.logged, self.unwritten = size // 24, bytearray()
        self.add_packed(os.pread(self.log_fd, 24 * max(0, self.logged - self.saved), 24 * self.saved))

    def count(self):
        return self.logged

    def record(self, processor, ms, cents):
        self.extend(LOG_ENTRY.pack(processor, ms, cents))

    def extend(self, packed):
        """Add packed LOG_ENTRY triples to the tail; to the log at the next flush() (each TICK_S)."""
        self.unwritten += packed
        self.logged += len(packed) // 24
        self.add_packed(packed)

    def flush(self):
        """Write the log's new entries; False if the disk refused them (kept; the journal's C records have them too)."""
        if not self.unwritten:
            return True
        size = 24 * self.logged - len(self.unwritten)
        try:
            if os.write(self.log_fd, self.unwritten) == len(self.unwritten):
                self.unwritten.clear()
                return True
        except OSError as error:
            log(f"ledger write failed: {error}")
        os.ftruncate(self.log_fd, size)
        return False

    def add_packed(self, packed):
        for processor, ms, cents in LOG_ENTRY.iter_unpack(packed):
            times, amounts = self.tail[processor]  # one sent before one confirmed earlier goes in its place
            at = bisect.bisect_right(times, ms) if times and ms < times[-1] else len(times)
            times.insert(at, ms)
            amounts.insert(at, cents)

    def read(self, start, end):
        """Log entries start..end-1, packed (what replication sends)."""
        written = self.logged - len(self.unwritten) // 24
        data = os.pread(self.log_fd, 24 * (min(end, written) - start), 24 * start) if start < written else b""
        return data + self.unwritten[24 * max(0, start - written):24 * (end - written)] if end > written else data

    def start(self, epoch, base=0, kept_from=-(1 << 62)):
        """Empty, at `epoch`; with `base`, its log starts there (what came before was dropped)."""
        self.epoch, self.saved, self.base, self.kept_from = epoch, base, base, kept_from
        self.frozen, self.frozen_ms, self.frozen_cents, self.kept = [0, 0], [-(1 << 62)] * 2, [0, 0], [0, 0]

    def window(self, processor, low, high):
        """(count, cents) of payments with low <= requestedAt <= high (low >= kept_from)."""
        times, amounts = self.tail[processor]
        first, last = bisect.bisect_left(times, low), bisect.bisect_right(times, high)
        count, cents = max(0, last - first), sum(amounts[first:last])
        column = FrozenColumn(self.sorted_fds[processor])
        frozen = self.frozen[processor]
        if frozen and low <= self.frozen_ms[processor]:
            first = bisect.bisect_left(column, low, self.kept[processor], frozen)
            last = bisect.bisect_right(column, high, first, frozen)
            if last > first:
                count += last - first
                cents += column.running(last - 1) - (column.running(first - 1) if first else 0)
        return count, cents

    def totals(self, low, high):
        return [*self.window(DEFAULT, low, high), *self.window(FALLBACK, low, high)]

    def freeze(self, drop_before=None):
        """Tail below `safe` -> sorted files, drop what precedes `drop_before` (ms), save a checkpoint; an entry
        below the frozen part (the clock went back) stays in the tail."""
        punches = self.drop(drop_before) if drop_before is not None else []
        moved = bool(punches)
        for p, (times, amounts) in enumerate(self.tail):
            first = bisect.bisect_left(times, self.frozen_ms[p])
            last = bisect.bisect_left(times, self.safe[p])
            if last <= first:
                continue
            out = array.array("q", bytes(16 * (last - first)))  # FROZEN_ENTRY pairs: (ms, running total)
            out[0::2] = times[first:last]
            out[1::2] = array.array("q", itertools.accumulate(amounts[first:last], initial=self.frozen_cents[p]))[1:]
            if os.write(self.sorted_fds[p], out) != len(out) * 8:
                os.ftruncate(self.sorted_fds[p], 16 * self.frozen[p])
                raise OSError(errno.ENOSPC, "short write")
            self.frozen[p] += last - first
            self.frozen_ms[p], self.frozen_cents[p] = out[-2], out[-1]
            del times[first:last], amounts[first:last]
            moved = True
        if (moved or self.saved != self.logged) and self.save():
            for fd, end in punches:  # once the checkpoint no longer needs them, free their disk blocks (whole pages)
                end -= end % 4096  # fallocate PUNCH_HOLE | KEEP_SIZE: the file keeps its size and offsets
                if end > 0 and LIBC.fallocate(fd, 3, ctypes.c_long(0), ctypes.c_long(end)) != 0:
                    log(f"retention could not free disk blocks: {os.strerror(ctypes.get_errno())}")

    def drop(self, before):
        """Forget frozen payments (and log entries) older than `before`; the (fd, end) the next checkpoint frees."""
        punches = []
        for p, fd in enumerate(self.sorted_fds):
            kept = bisect.bisect_left(FrozenColumn(fd), before, self.kept[p], self.frozen[p])
            if kept > self.kept[p]:  # the entry before the first kept stays: its running total
                self.kept[p] = kept
                punches.append((fd, 16 * (kept - 1)))
        base, first_kept = self.base, None  # first_kept: the first log entry of a chunk to keep
        while base < self.saved and first_kept is None:
            chunk = os.pread(self.log_fd, 24 * min(4096, self.saved - base), 24 * base)
            first_kept = next((i for i, (_, ms, _) in enumerate(LOG_ENTRY.iter_unpack(chunk)) if ms >= before), None)
            base += len(chunk) // 24 if first_kept is None else first_kept
        if base > self.base:
            self.base = base
            punches.append((self.log_fd, 24 * base))
        if punches:
            self.kept_from = max(self.kept_from, before)
        return punches

    def save(self):
        """Write the checkpoint (the log first); False if the disk refused the log."""
        if not self.flush():
            return False
        if self.fsync:
            for fd in (self.log_fd, *self.sorted_fds):
                os.fsync(fd)
        tail = b"".join(column.tobytes() for pair in self.tail for column in pair)
        numbers = (self.epoch, self.logged, *self.frozen, *self.frozen_ms, *self.frozen_cents, *self.kept,
                   *(len(times) for times, _ in self.tail), self.kept_from, self.base)
        head = b" ".join(b"%d" % n for n in numbers)
        temporary = self.path + ".checkpoint.new"
        with open(temporary, "wb") as file:
            file.write(head + b"\n" + tail)
            if self.fsync:
                os.fsync(file.fileno())
        os.replace(temporary, self.path + ".checkpoint")
        self.saved = self.logged
        return True

    def clear(self, epoch, base=0, kept_from=-(1 << 62)):
        """Empty it: a purge (at `epoch`), or a replica whose origin dropped its log before `base` (retention)."""
        for fd in (self.log_fd, *self.sorted_fds):
            os.ftruncate(fd, 0)
        self.start(epoch, base, kept_from)
        os.ftruncate(self.log_fd, 24 * base)  # a hole: entry i stays at offset 24 i
        self.logged = base
        self.unwritten.clear()
        self.safe = list(self.frozen_ms)
        for times, amounts in self.tail:
            del times[:], amounts[:]
        self.save()

    def close(self):
        for fd in (self.log_fd, *self.sorted_fds):
            os.close(fd)


LOG_ENTRY = struct.Struct("=qqq")  # processor, requestedAt ms, cents
FROZEN_ENTRY = struct.Struct("=qq")  # requestedAt ms, running total of cents
LIBC = ctypes.CDLL(None, use_errno=True)


class FrozenColumn:
    """A sorted file's requestedAt column as a sequence, for bisect: one pread per probe."""
    __slots__ = ("fd",)

    def __init__(self, fd):
        self.fd = fd

    def __getitem__(self, index):
        return FROZEN_ENTRY.unpack(os.pread(self.fd, 16, 16 * index))[0]

    def running(self, index):
        return FROZEN_ENTRY.unpack(os.pread(self.fd, 16, 16 * index))[1]


class RecentIds:
    """The last REMEMBERED_IDS ids accepted here or by peers (A, I records keep them): a retry is the same payment."""
    __slots__ = ("limit", "known", "order")

    def __init__(self, limit):
        self.limit = limit
        self.reset()

    def reset(self, ids=()):
        self.known, self.order = set(), deque()
        for cid in ids:
            self.add(cid)

    def add(self, cid):
        if cid not in self.known:
            self.known.add(cid)
            self.order.append(cid)
            if len(self.order) > self.limit:
                self.known.discard(self.order.popleft())


# The journal's records, one line each: the kind's letter, then its fields (integers, or a correlationId),
# space-separated. Every writer encodes with record() and replay decodes with read_record(), from this one table.
RECORDS = {  # kind -> (format, meaning)
    b"A": (b"A %d %s %d %d\n", "accepted: seq cid cents accepted_ms"),
    b"S": (b"S %d %d %d\n", "about to send: seq processor requested_ms"),
    b"C": (b"C %d %d %d %d %d\n", "confirmed: seq processor requested_ms cents, its index in the ledger's log"),
    b"X": (b"X %d\n", "settled, not ours (a duplicate, or refused for good): seq"),
    b"U": (b"U %d\n", "an attempt proved not stored, the payment unpinned: seq"),
    b"P": (b"P %d\n", "purge, the ledger emptied: epoch"),
    b"I": (b"I %s\n", "an id accepted here or by a peer, remembered (written by peers and compactions): cid"),
}
FIELD_TYPES = {kind: tuple(bytes if spec == b"%s" else int for spec in re.findall(rb"%[ds]", layout))
               for kind, (layout, _) in RECORDS.items()}


def record(kind, *fields):
    """The bytes of one record: record(b"X", 12) -> b"X 12\n"."""
    return RECORDS[kind][0] % fields


def read_record(line):
    """One line -> (kind, fields); ValueError if it is not a whole record of a known kind."""
    parts = line.split()
    types = FIELD_TYPES.get(parts[0] if parts else b"")
    if types is None or len(parts) != len(types) + 1:
        raise ValueError("unknown kind or wrong number of fields")
    if bytes not in types:  # most records: integers only, converted at C speed
        return parts[0], tuple(map(int, parts[1:]))
    return parts[0], tuple(kind(part) for kind, part in zip(types, parts[1:]))


class Journal:
    """Append-only record of this instance (RECORDS); seq numbers its accepted payments (two with one id never share a
    record). A failed or short write is cut back to the last whole record. A full disk frees JOURNAL_RESERVE_BYTES set
    aside beside it for the records of payments already accepted; it is `full` (new ones refused) until the reserve
    fits again. compaction() rewrites it as its state, at start and whenever it has doubled."""
    __slots__ = ("path", "config", "fd", "end", "torn", "full", "compacted", "compacting")

    def __init__(self, path, config):
        self.path, self.config, self.fd = path, config, -1
        self.end = self.compacted = 0  # just past the last whole record; the size right after the last compaction
        self.torn = self.full = self.compacting = False  # torn: a failed write not cut back yet; full: reserve spent

    def replay(self, ledger, recent):
        """Rebuild the remembered ids and mend the ledger (adding a confirmation its log lost) from the journal since
        its last compaction: (pending {seq: [cid, cents, accepted_ms, pin]} in order of acceptance, next free seq)."""
        pending, next_seq, epoch = {}, 0, 0
        if not os.path.exists(self.path):
            return pending, next_seq
        with open(self.path, "rb") as file:
            lines = file.read().split(b"\n")
        if lines[-1]:
            log(f"journal ends in a torn record, ignored: {lines[-1][:80]!r}")
        for number, line in enumerate(lines[:-1], 1):
            try:
                kind, fields = read_record(line)
            except ValueError:
                log(f"journal line {number} unreadable, skipped: {line[:80]!r}")
                continue
            if kind == b"P":  # a purge; also heads a compaction
                epoch = fields[0]
                if ledger.epoch < epoch:  # stopped between the two
                    ledger.clear(epoch)
                recent.reset()
            elif kind == b"I":
                recent.add(fields[0])
            elif kind == b"A":
                pending[fields[0]] = [*fields[1:], None]
                recent.add(fields[1])
                next_seq = max(next_seq, fields[0] + 1)
            elif kind == b"C" or kind == b"X":  # settled
                if kind == b"C" and epoch == ledger.epoch and fields[4] == ledger.count():
                    ledger.record(*fields[1:4])
                pending.pop(fields[0], None)
            elif fields[0] in pending:  # S pins, U unpins
                pending[fields[0]][3] = fields[1:] if kind == b"S" else None
        return pending, next_seq

    def open_compacted(self, ledger, pending, remembered=()):
        """At start: open it (a torn last record is cut before the next append) and compact it, as while running."""
        self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(self.fd).st_size
        tail = os.pread(self.fd, 4096, max(0, size - 4096))
        self.end = self.compacted = size - len(tail) + tail.rfind(b"\n") + 1
        self.torn, self.full = self.end != size, not self.make_reserve()
        ledger.save()  # every confirmation the journal mended is in the ledger's files first
        for _ in self.compaction(ledger.epoch, pending, self.end, remembered, "at start"):
            pass

    async def compact(self, epoch, pending, start, remembered=()):  # while running: a slice per turn of the loop
        for _ in self.compaction(epoch, pending, start, remembered):
            await asyncio.sleep(0)

    def compaction(self, epoch, pending, start, remembered, when="while running"):
        """Write the state as of when the journal ended at `start` (epoch, pending payments, remembered ids) to a new
        file, JOURNAL_COMPACT_SLICE records a step (the loop runs between), then what came since; sync, rename it over
        the journal: a crash leaves one whole journal, old or new. If it fails (disk full), the old one goes on."""
        temporary, fd, directory = self.path + ".compact", -1, -1
        self.compacting = True
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            records = snapshot_records(epoch, pending, remembered)
            while chunk := b"".join(itertools.islice(records, self.config.journal_compact_slice)):
                write_whole(fd, chunk)
                yield
            write_whole(fd, os.pread(self.fd, self.end - start, start))  # appended meanwhile
            os.fsync(fd)
            os.replace(temporary, self.path)
            if self.config.journal_fsync:  # make the rename itself durable
                directory = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
                os.fsync(directory)
            os.close(self.fd)
            self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND, 0o644)
            self.end = self.compacted = os.fstat(self.fd).st_size
            self.torn = False
            log(f"journal compacted {when}: {start} -> {self.end} bytes")
        except OSError as error:
            log(f"journal not compacted ({error}); appending to it as it is")
            if os.path.exists(temporary):
                os.unlink(temporary)
        finally:
            for opened in (fd, directory):
                if opened >= 0:
                    os.close(opened)
            self.compacting = False

    def make_reserve(self):
        try:
            with open(self.path + ".reserve", "ab") as file:
                os.posix_fallocate(file.fileno(), 0, max(1, self.config.journal_reserve_bytes))
            return True
        except OSError:
            return False

    def retry_reserve(self):
        if self.full and self.make_reserve():
            self.full = False
            log("journal: the disk has room again")

    def append(self, line):
        """Write a whole record or none (OSError); the first write to find the disk full frees the reserve, retries."""
        if self.torn:
            self.cut_back()
        try:
            written = os.write(self.fd, line)
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                self.cut_back()
                raise
            written = -1
        if written != len(line):
            self.cut_back()
            if self.full:
                raise OSError(errno.ENOSPC, "the journal's disk is full")
            self.full = True
            log("journal: the disk is full; new payments are refused until it has room")
            if os.path.exists(self.path + ".reserve"):
                os.unlink(self.path + ".reserve")
            return self.append(line)
        self.end += written
        if self.config.journal_fsync:
            os.fdatasync(self.fd)

    def append_quietly(self, line):
        """append(), a failure only logged: for records a restart can do without (replay resends; a 422 settles)."""
        try:
            self.append(line)
        except OSError as error:
            log(f"journal write failed: {error}")

    def cut_back(self):
        self.torn = True
        os.ftruncate(self.fd, self.end)  # OSError propagates: still torn, retried next time
        self.torn = False


def snapshot_records(epoch, pending, remembered=()):
    if epoch:
        yield record(b"P", epoch)
    for cid in remembered:
        yield record(b"I", cid)
    for seq, (cid, cents, accepted, pin) in pending.items():
        yield record(b"A", seq, cid, cents, accepted)
        if pin:
            yield record(b"S", seq, *pin)


def write_whole(fd, data):
    if os.write(fd, data) != len(data):
        raise OSError(errno.ENOSPC, "short write")


# ---- Queue ----------------------------------------------------------------
# Accepted payments not yet settled, each a Payment in one place of the Backlog; capacity counts all, in flight too.
class Payment:
    """One accepted payment until settled. `processor`, `requested_ms`: its latest attempt; while that may have landed
    it is pinned there (settle_from: the pin's clock), going again only there with that requestedAt: a 422 is ours."""
    __slots__ = ("seq", "cid", "cents", "accepted_ms", "processor", "requested_ms", "settle_from")

    def __init__(self, seq, cid, cents, accepted_ms, pin=None, settle_from=None):
        self.seq, self.cid, self.cents, self.accepted_ms = seq, cid, cents, accepted_ms
        self.processor, self.requested_ms = pin if pin else (None, None)
        self.settle_from = settle_from if pin else None


class Backlog:
    """Invariant: every unsettled payment is in exactly one of `ready` (oldest first), `pinned[p]` (waiting for
    processor p) or `flying` (under way, by seq); only these methods move one, and check() proves it."""
    __slots__ = ("capacity", "nearly", "ready", "pinned", "flying")

    def __init__(self, config):
        self.capacity = config.queue_capacity
        self.nearly = config.queue_capacity * config.fallback_queue_fraction
        self.ready, self.pinned, self.flying = deque(), (deque(), deque()), {}

    def unsettled(self):
        return len(self.ready) + len(self.pinned[DEFAULT]) + len(self.pinned[FALLBACK]) + len(self.flying)

    def full(self):
        return self.unsettled() >= self.capacity

    def nearly_full(self):
        return len(self.ready) >= self.nearly

    def add(self, payment):
        (self.ready if payment.processor is None else self.pinned[payment.processor]).append(payment)

    def fly(self, payment, processor, requested_ms):
        payment.processor, payment.requested_ms = processor, requested_ms
        self.flying[payment.seq] = payment

    def next_ready(self):
        return self.ready.popleft()

    def next_pinned(self, processor):
        return self.pinned[processor].popleft()

    def take_pinned(self, payment):
        """A pinned payment out of its line for a lookup; False if it has left it meanwhile."""
        try:
            self.pinned[payment.processor].remove(payment)
        except ValueError:
            return False
        self.flying[payment.seq] = payment
        return True

    def land(self, payment, after, settle_from=None):
        """An attempt or lookup ended: the payment is PINNED (settle_from: the pin's clock), QUEUED again, or gone."""
        del self.flying[payment.seq]
        if after is PINNED:
            payment.settle_from = settle_from
            self.pinned[payment.processor].append(payment)
        elif after is QUEUED:
            payment.processor = payment.requested_ms = payment.settle_from = None
            self.ready.appendleft(payment)

    def pins(self):
        """How many payments are pinned (waiting, or under an attempt that may land too)."""
        return (len(self.pinned[DEFAULT]) + len(self.pinned[FALLBACK])
                + sum(payment.settle_from is not None for payment in self.flying.values()))

    def pending(self):
        """Every unsettled payment as replay rebuilds it, in order; one under way is pinned where its attempt went."""
        state = {}
        for payment in itertools.chain(self.ready, *self.pinned, self.flying.values()):
            pin = None if payment.processor is None else (payment.processor, payment.requested_ms)
            state[payment.seq] = [payment.cid, payment.cents, payment.accepted_ms, pin]
        return dict(sorted(state.items()))

    def check(self):
        """The rule above, or AssertionError: each payment in one place, its fields agreeing."""
        seen = [payment.seq for payment in itertools.chain(self.ready, *self.pinned, self.flying.values())]
        assert len(seen) == len(set(seen)) == self.unsettled(), "a payment in two places"
        assert all(payment.processor is None and payment.settle_from is None for payment in self.ready)
        assert all(payment.processor == p and payment.requested_ms is not None and payment.settle_from is not None
                   for p, waiting in enumerate(self.pinned) for payment in waiting)
        assert all(seq == payment.seq and payment.processor is not None and payment.requested_ms is not None
                   for seq, payment in self.flying.items())


# ---- Processor client -----------------------------------------------------
# A keep-alive HTTP/1.1 connection pool per upstream (processor or peer), over TCP or a unix socket. One request
# per connection at a time; any doubt closes the connection.
class UpstreamError(Exception):
    """No usable answer: connection lost, timeout, or a malformed response."""


class NotSent(UpstreamError):
    """Nothing of the request left this process: no connection, or it closed before the write."""


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
    status, keep_alive = int(status_line[1]), status_line[0] == b"HTTP/1.1"
    length, chunked = None, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length" and value.isdigit():
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value:
            chunked = True
        elif name == b"connection":
            keep_alive = b"close" not in value and (keep_alive or b"keep-alive" in value)
    start = end + 4
    if chunked:
        return parse_chunked(buffer, start, status, keep_alive)
    if length is None and status >= 200 and status not in (204, 304):  # a body up to the close: not supported
        raise UpstreamError("response without length")
    end = start + (length or 0)
    return None if len(buffer) < end else (status, bytes(buffer[start:end]), keep_alive, end)


def parse_chunked(buffer, at, status, keep_alive):
    body = bytearray()
    while (line_end := buffer.find(b"\r\n", at)) >= 0:
        try:
            size = int(bytes(buffer[at:line_end]).split(b";")[0], 16)
        except ValueError:
            raise UpstreamError("malformed chunk size") from None
        at = line_end + 2
        if size == 0:  # the end: trailer fields, if any, then an empty line
            end = buffer.find(b"\r\n\r\n", at - 2)
            return None if end < 0 else (status, bytes(body), keep_alive, end + 4)
        if len(buffer) < at + size + 2:
            return None
        body += buffer[at:at + size]
        at += size + 2
    return None


class UpstreamConnection(asyncio.Protocol):
    __slots__ = ("transport", "buffer", "waiter", "timer", "reusable")

    def __init__(self):
        self.transport = self.waiter = self.timer = None
        self.buffer, self.reusable = bytearray(), True

    def connection_made(self, transport):
        self.transport = transport

    def send(self, data, timeout):
        if self.transport.is_closing():
            raise NotSent("connection closed")
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
    __slots__ = ("name", "host", "port", "timeout", "idle", "host_header")

    def __init__(self, name, url, timeout):
        self.name, self.timeout, self.idle = name, timeout, []
        if url.startswith("unix:"):  # 'unix:/path' or 'http://host:port': (host or None, port or path)
            self.host, self.port = None, url[5:]
        else:
            rest = url.split("://", 1)[-1].split("/", 1)[0]
            host, _, port = rest.rpartition(":")
            self.host, self.port = (host, int(port)) if host else (rest, 80)
        self.host_header = (f"{self.host}:{self.port}" if self.host else "localhost").encode()

    async def request(self, method, path, body=b"", headers=b"", timeout=None):
        """(status, body), or UpstreamError; a GET failing on a reused (maybe idle-closed) connection goes again."""
        connection, timeout = None, timeout or self.timeout
        while self.idle and connection is None:
            connection = self.idle.pop()
            if not connection.reusable or connection.transport.is_closing():
                connection = None
        reused = connection is not None
        if connection is None:
            loop = asyncio.get_running_loop()
            try:
                if self.host is None:
                    _, connection = await loop.create_unix_connection(UpstreamConnection, self.port)
                else:
                    _, connection = await loop.create_connection(UpstreamConnection, self.host, self.port)
            except OSError as error:
                raise NotSent(f"cannot connect to {self.name}: {error}") from None
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


# ---- Router and breaker ---------------------------------------------------
# Two tables hold every decision: what each outcome of an attempt does to the payment and to the breaker. The
# promise: the summary equals the processors' records for any window ending PROMISE_MARGIN_S before the request, so
# a processor slower than that costs as failure does (DESIGN.md weighs the fees against the fine; route() decides).
# A payment whose attempt may have landed is pinned there until an answer or a lookup settles it.

# A payment's states (IN_FLIGHT: the attempt itself, Backlog.flying); the tables map state and outcome to the next.
QUEUED, IN_FLIGHT, PINNED, CONFIRMED, NOT_OURS = "queued", "in flight", "pinned", "confirmed", "not ours"

# Outcomes of an attempt (POST /payments to one processor).
OK, THROTTLED, REJECTED, FAILED = "200", "429", "other 4xx", "5xx"  # 5xx: the processor fails before it stores
STORED_OURS = "422, stored with our requestedAt"  # a 422 on a pinned payment is looked up
STORED_OTHER, STORED_UNREAD = "422, stored by another request", "422, lookup unanswered"
NOT_SENT = "not sent"  # refused, or closed before the request was written
ANSWER_LOST = "answer lost"  # written, then a timeout, a lost connection or a garbled answer
JOURNAL_FAILED = "journal write failed"  # so nothing was sent
CRASHED = "unexpected exception"  # a bug in this file; the request may have gone out
ATTEMPT_OUTCOMES = (OK, STORED_OURS, STORED_OTHER, STORED_UNREAD, REJECTED, THROTTLED, FAILED,
                    NOT_SENT, ANSWER_LOST, JOURNAL_FAILED, CRASHED)
MAY_LAND_LATER = (ANSWER_LOST, CRASHED)  # the pin's settle clock (re)starts with these
# Outcomes of looking up a pinned payment (GET /payments/{id}) once its pin has settled.
FOUND_OURS, FOUND_OTHER, ABSENT, UNCHECKED = "found, ours", "found, not ours", "404", "lookup unanswered"
LOOKUP_OUTCOMES = (FOUND_OURS, FOUND_OTHER, ABSENT, UNCHECKED)

# What the breaker learns from an outcome, and from the health endpoint.
SUCCESS, FAILURE, NEUTRAL, NOTHING = "success", "failure", "neutral", None
REPORTED_FAILING, REPORTED_OK = "reported failing", "reported ok"

PAYMENT_TRANSITIONS = {  # (state before the attempt, outcome) -> (state after, breaker signal)
    (QUEUED, OK): (CONFIRMED, SUCCESS), (PINNED, OK): (CONFIRMED, SUCCESS),
    (QUEUED, STORED_OURS): (CONFIRMED, SUCCESS), (PINNED, STORED_OURS): (CONFIRMED, SUCCESS),
    (QUEUED, STORED_OTHER): (NOT_OURS, SUCCESS), (PINNED, STORED_OTHER): (NOT_OURS, SUCCESS),  # another sent it first
    (QUEUED, STORED_UNREAD): (PINNED, NEUTRAL), (PINNED, STORED_UNREAD): (PINNED, NEUTRAL),
    (QUEUED, REJECTED): (NOT_OURS, SUCCESS), (PINNED, REJECTED): (NOT_OURS, SUCCESS),
    (QUEUED, THROTTLED): (QUEUED, NEUTRAL), (PINNED, THROTTLED): (PINNED, NEUTRAL),
    (QUEUED, FAILED): (QUEUED, FAILURE), (PINNED, FAILED): (PINNED, FAILURE),  # pinned: an earlier one may land
    (QUEUED, NOT_SENT): (QUEUED, FAILURE), (PINNED, NOT_SENT): (PINNED, FAILURE),
    (QUEUED, ANSWER_LOST): (PINNED, FAILURE), (PINNED, ANSWER_LOST): (PINNED, FAILURE),
    (QUEUED, JOURNAL_FAILED): (QUEUED, NEUTRAL), (PINNED, JOURNAL_FAILED): (PINNED, NEUTRAL),
    (QUEUED, CRASHED): (PINNED, NEUTRAL), (PINNED, CRASHED): (PINNED, NEUTRAL),
    (PINNED, FOUND_OURS): (CONFIRMED, NOTHING), (PINNED, FOUND_OTHER): (NOT_OURS, NOTHING),
    (PINNED, ABSENT): (QUEUED, NOTHING), (PINNED, UNCHECKED): (PINNED, NOTHING),  # absent: it can no longer land
}

# Breaker states: closed sends; open sends nothing until retry_at; half-open has one probe out. COUNTED: open after
# BREAKER_FAILURES failures in a row. PROBE_NOW: open, retry_at now (a probe proved nothing, or health recovered).
CLOSED, OPEN, HALF_OPEN, COUNTED, PROBE_NOW, SAME = "closed", "open", "half-open", "counted", "probe now", "same"
BREAKER_TRANSITIONS = {  # (state, signal) -> next
    (CLOSED, SUCCESS): CLOSED, (CLOSED, FAILURE): COUNTED, (CLOSED, NEUTRAL): CLOSED,
    (CLOSED, REPORTED_FAILING): OPEN, (CLOSED, REPORTED_OK): CLOSED,
    (OPEN, SUCCESS): CLOSED, (OPEN, FAILURE): SAME, (OPEN, NEUTRAL): SAME,
    (OPEN, REPORTED_FAILING): SAME, (OPEN, REPORTED_OK): PROBE_NOW,
    (HALF_OPEN, SUCCESS): CLOSED, (HALF_OPEN, FAILURE): OPEN, (HALF_OPEN, NEUTRAL): PROBE_NOW,
    (HALF_OPEN, REPORTED_FAILING): SAME, (HALF_OPEN, REPORTED_OK): SAME,  # the probe decides
}


class Breaker:
    __slots__ = ("config", "state", "failures", "retry_at", "failing_since", "reported_failing")

    def __init__(self, config):
        self.config, self.state, self.retry_at, self.failures = config, CLOSED, 0.0, 0  # failures: in a row
        self.failing_since = None  # monotonic time of the first failure since the last success
        self.reported_failing = None  # what the health endpoint said last

    def allows(self, now):
        """Whether an attempt may start now; the first one after retry_at is the probe."""
        if self.state is CLOSED:
            return True
        if self.state is OPEN and now >= self.retry_at:
            self.state = HALF_OPEN
            return True
        return False

    def observe(self, signal, now):
        if signal is SUCCESS:
            self.failures, self.failing_since = 0, None
        elif signal is FAILURE or signal is REPORTED_FAILING:
            self.failures += signal is FAILURE
            if self.failing_since is None:
                self.failing_since = now
        target = BREAKER_TRANSITIONS[self.state, signal]
        if target is COUNTED:
            target = OPEN if self.failures >= self.config.breaker_failures else CLOSED
        if target is OPEN:
            self.state, self.retry_at = OPEN, now + self.config.breaker_retry_s
        elif target is PROBE_NOW:
            self.state, self.retry_at = OPEN, now
        elif target is not SAME:
            self.state = target

    def down_for(self, now):
        return 0.0 if self.failing_since is None else now - self.failing_since


class Lane:
    """One processor as the router sees it: connections, breaker, in-flight limit, whether it keeps the summary's
    promise. The limit: FORWARD_RATE x (latency + FORWARD_BATCH_S) (Little's law, with the pump's batching), between
    IN_FLIGHT_MIN and a ceiling (IN_FLIGHT_CAP, halved by a 429, +1 per answer). The promise (see Router) holds while
    the latest-sent stored attempt took under PROMISE_MARGIN_S - PROMISE_HEADROOM_S and none is out longer, nor over
    max(SUSPECT_MIN_S, 3 x that latency), which stops sends at once."""
    __slots__ = ("config", "index", "upstream", "breaker", "in_flight", "limit", "ceiling", "latency", "confirmed",
                 "failed", "outstanding", "promise_latency", "promise_sent", "keeping", "slow_since", "probe_at")

    def __init__(self, index, url, config):
        self.config, self.index, self.breaker = config, index, Breaker(config)
        self.upstream = Upstream(PROCESSOR_NAMES[index], url, config.processor_timeout_s)
        self.in_flight = self.confirmed = self.failed = 0
        self.limit, self.ceiling = min(config.in_flight_min, config.in_flight_cap), config.in_flight_cap
        self.latency = 0.0  # seconds, moving average over answered attempts
        self.outstanding = deque()  # [monotonic start] of the attempts out, oldest first; None once answered
        self.promise_latency = self.promise_sent = 0.0  # the latest-sent stored attempt: seconds it took, when sent
        self.keeping = True  # whether the lane keeps the promise, as of the latest pump
        self.slow_since = None  # when a working lane was first seen breaking it; None while keeping
        self.probe_at = 0.0  # while it breaks it: when the next probe may go (Pipeline.route)

    def sending(self, now):
        mark = [now]
        self.outstanding.append(mark)
        return mark

    def answered(self, mark, now, status):
        """An attempt ended (status None: no answer): answers teach the limit; stored ones, when stores land."""
        started, mark[0] = mark[0], None
        seconds = now - started
        if (status == 200 or status == 422) and started >= self.promise_sent:  # the freshest evidence
            self.promise_sent, self.promise_latency = started, seconds
        outstanding = self.outstanding  # attempts sent before the freshest evidence tell nothing more
        while outstanding and (outstanding[0][0] is None or outstanding[0][0] <= self.promise_sent):
            outstanding.popleft()
        if status is None:
            return
        config = self.config
        self.latency += (seconds - self.latency) * config.latency_weight
        self.ceiling = min(config.in_flight_cap, self.ceiling + 1)
        target = max(config.in_flight_min, math.ceil(config.forward_rate * (self.latency + config.forward_batch_s)))
        self.limit = min(target, self.ceiling)

    def throttled(self):
        self.ceiling = self.limit = max(min(self.config.in_flight_min, self.config.in_flight_cap), self.limit // 2)

    def check_promise(self, now):
        """Whether sends here now keep the promise; a working lane (not a down one) that breaks it starts slow_since."""
        config = self.config
        bound = config.promise_margin_s - config.promise_headroom_s
        oldest = now - self.outstanding[0][0] if self.outstanding else 0.0
        suspect = max(config.suspect_min_s, 3 * self.promise_latency)
        self.keeping = self.promise_latency < bound and oldest < min(bound, suspect)
        if self.keeping or self.breaker.state is not CLOSED:
            self.slow_since = None
        elif self.slow_since is None:
            self.slow_since = now
        return self.keeping


class Pipeline:
    """Backlog, lanes, ledger, journal. Attempts start from pump(), run after anything that can let a payment move."""

    def __init__(self, config, journal, ledger, pending=None, next_seq=0, recent=None):
        """pending: payments replayed from the journal, queued first whatever their number: never dropped."""
        self.config, self.journal, self.ledger, self.next_seq = config, journal, ledger, next_seq
        self.backlog, self.outboxes = Backlog(config), []  # outboxes, per peer: ids accepted here, to tell it
        self.recent = recent or RecentIds(config.remembered_ids)  # as replayed from the journal
        self.lanes = (Lane(DEFAULT, config.default_processor_url, config),
                      Lane(FALLBACK, config.fallback_processor_url, config))
        self.accepted = self.duplicates = self.rejected = 0
        self.running, self.pump_due = True, False
        self.pumped_at = -config.forward_batch_s  # time.monotonic() of the latest pump that sent
        self.wake, self.wake_at = None, 0.0  # timer for the next moment a held payment may move
        now = time.monotonic()
        for seq, (cid, cents, accepted, pin) in (pending or {}).items():
            self.recent.add(cid)  # accepted before a purge: still ours
            self.backlog.add(Payment(seq, cid, cents, accepted, pin, now))  # a pin's clock restarts

    def accept(self, cid, cents):
        """Journal then queue a payment, or HttpError; an id accepted already is the same payment: nothing to do."""
        if cid in self.recent.known:
            self.duplicates += 1
            return
        backlog = self.backlog
        if backlog.full():
            raise RetryLater("queue full, retry later")
        if self.journal.full:
            raise RetryLater("the journal's disk is full, retry later")
        seq, accepted = self.next_seq, now_ms()
        try:
            self.journal.append(record(b"A", seq, cid, cents, accepted))
        except OSError as error:
            log(f"journal write failed: {error}")
            raise Unavailable("journal unavailable") from None
        self.next_seq = seq + 1
        self.recent.add(cid)
        for outbox in self.outboxes:
            outbox += cid
        backlog.add(Payment(seq, cid, cents, accepted))
        self.accepted += 1
        self.pump_soon()

    def pump_soon(self):
        """Pump at once, or FORWARD_BATCH_S after the latest pump that sent: fewer wakeups (DESIGN.md, The pump)."""
        if not self.pump_due:
            self.pump_due = True
            wait = self.pumped_at + self.config.forward_batch_s - time.monotonic()
            if wait > 0:
                asyncio.get_running_loop().call_later(wait, self.pump)
            else:
                asyncio.get_running_loop().call_soon(self.pump)

    def pump(self):
        """Start what may start now: pinned payments on their own lane, then the rest where route() says."""
        self.pump_due = False
        if not self.running:
            return
        now, backlog, in_flight = time.monotonic(), self.backlog, self.in_flight()
        for lane in self.lanes:
            lane.check_promise(now)
            waiting = backlog.pinned[lane.index]
            while waiting and lane.in_flight < lane.limit and lane.breaker.allows(now):
                self.start(backlog.next_pinned(lane.index), lane, PINNED)
        while backlog.ready and (lane := self.route(now)) is not None:
            self.start(backlog.next_ready(), lane, QUEUED)
        if self.in_flight() > in_flight:  # pacing counts the pumps that sent something
            self.pumped_at = now
        self.arm_wake(now)

    def route(self, now):
        """The lane for the next unpinned payment, or None to hold it: the default while it works and keeps the
        promise; the fallback once the default has failed FALLBACK_AFTER_S with no success between, or been too slow
        PROMISE_HOLD_S while the fallback keeps it (a 10 % higher fee against a 35 % fine); else the default after
        FALLBACK_AFTER_S (late earns 65 %, held at the end nothing). Near capacity, waiting ends at once."""
        default, fallback = self.lanes
        if default.keeping or default.breaker.state is not CLOSED:  # fast enough, or down
            if default.in_flight < default.limit and default.breaker.allows(now):
                return default
            if default.breaker.state is CLOSED:
                return None  # working, only busy: worth the wait
            if default.breaker.down_for(now) < self.config.fallback_after_s and not self.backlog.nearly_full():
                return None  # down, but not for long yet
            return fallback if fallback.in_flight < fallback.limit and fallback.breaker.allows(now) else None
        # Working, but too slow to keep the promise: probes learn when it is fast again. One at a time; or one every
        # PROBE_INTERVAL_S while the summaries wait for its stores (landed()).
        config = self.config
        if default.in_flight == 0 or (now >= default.probe_at
                                      and default.promise_latency < config.promise_margin_s + config.summary_wait_s):
            default.probe_at = now + config.probe_interval_s
            return default
        slow_for = now - default.slow_since
        if fallback.keeping and fallback.breaker.state is CLOSED:
            if slow_for >= config.promise_hold_s or self.backlog.nearly_full():
                return fallback if fallback.in_flight < fallback.limit else None
        elif slow_for >= config.fallback_after_s or self.backlog.nearly_full():
            return default if default.in_flight < default.limit else None  # neither keeps it
        return None

    def arm_wake(self, now):
        """Pump again when a held payment may move: a breaker's probe, the default down or slow long enough."""
        backlog, default, config = self.backlog, self.lanes[DEFAULT], self.config
        moments = [lane.breaker.retry_at for lane in self.lanes if lane.breaker.state is OPEN
                   and (backlog.ready or backlog.pinned[lane.index])]
        if backlog.ready and default.breaker.failing_since is not None:
            moments.append(default.breaker.failing_since + config.fallback_after_s)
        if backlog.ready and default.slow_since is not None:
            moments += (default.slow_since + config.promise_hold_s, default.slow_since + config.fallback_after_s)
        at = min((moment for moment in moments if moment > now), default=None)
        if at is None or (self.wake is not None and self.wake_at <= at):
            return
        if self.wake is not None:
            self.wake.cancel()
        self.wake_at = at  # the loop's timers may fire up to a millisecond early: aim just after the moment
        self.wake = asyncio.get_running_loop().call_later(at - now + 0.001, self.woken)

    def woken(self):
        self.wake = None
        self.pump()

    def start(self, payment, lane, state):
        """Hand a payment to an attempt; from this moment pending() sees it as under way."""
        lane.in_flight += 1  # a pinned payment goes again with the same requestedAt, so a 422 can prove it ours
        self.backlog.fly(payment, lane.index, payment.requested_ms if state is PINNED else now_ms())
        asyncio.get_running_loop().create_task(self.attempt(payment, lane, state))

    async def attempt(self, payment, lane, state):
        outcome = CRASHED
        try:
            outcome = await self.send(payment, lane, state is PINNED)
        except Exception as error:  # a bug must not strand the payment: the table settles it
            log(f"attempt for {payment.cid.decode()} failed unexpectedly: {error!r}")
        finally:
            lane.in_flight -= 1
            self.settle(payment, lane, state, outcome)

    async def send(self, payment, lane, pinned):
        requested = payment.requested_ms
        try:
            self.journal.append(record(b"S", payment.seq, lane.index, requested))
        except OSError as error:
            log(f"journal write failed: {error}")
            await asyncio.sleep(self.config.journal_retry_s)  # holding its slot: no retry loop meanwhile
            return JOURNAL_FAILED
        body = PROCESSOR_BODY % (payment.cid, cents_text(payment.cents), iso_ms(requested))
        mark, status = lane.sending(time.monotonic()), None
        try:
            status, _ = await lane.upstream.request(b"POST", b"/payments", body, JSON_HEADER)
        except NotSent:
            return NOT_SENT
        except UpstreamError:
            return ANSWER_LOST
        finally:
            lane.answered(mark, time.monotonic(), status)
        if status == 200:
            return OK
        if status == 422:  # stored already: by an earlier attempt of ours, or by someone else
            if not pinned:
                return STORED_OTHER
            found = await self.lookup(lane, payment.cid, requested)
            return STORED_OURS if found is FOUND_OURS else STORED_OTHER if found is FOUND_OTHER else STORED_UNREAD
        if status == 429:
            lane.throttled()
            return THROTTLED
        return REJECTED if 400 <= status < 500 else FAILED

    async def lookup(self, lane, cid, requested):
        try:
            status, body = await lane.upstream.request(b"GET", b"/payments/" + cid)
            if status == 404:
                return ABSENT
            if status != 200:
                return UNCHECKED
            stored = parse_iso_ms(orjson.loads(body)["requestedAt"], round_up=False)
        except (UpstreamError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return UNCHECKED
        return FOUND_OURS if stored == requested else FOUND_OTHER

    def settle(self, payment, lane, state, outcome):
        """Apply PAYMENT_TRANSITIONS: the one place a payment changes state after an attempt."""
        after, signal = PAYMENT_TRANSITIONS[state, outcome]
        now = time.monotonic()
        if signal is not NOTHING:
            lane.breaker.observe(signal, now)
            lane.failed += signal is FAILURE
        seq, requested = payment.seq, payment.requested_ms
        earlier = payment.settle_from  # None: it was not pinned before this attempt
        self.backlog.land(payment, after, now if earlier is None or outcome in MAY_LAND_LATER else earlier)
        if after is QUEUED:
            self.journal.append_quietly(record(b"U", seq))
        elif after is CONFIRMED:
            lane.confirmed += 1  # the journal first: a replay adds what the ledger then lacks
            ledger = self.ledger
            self.journal.append_quietly(record(b"C", seq, lane.index, requested, payment.cents, ledger.count()))
            ledger.record(lane.index, requested, payment.cents)
        elif after is NOT_OURS:
            if outcome is REJECTED:
                self.rejected += 1
                log(f"{PROCESSOR_NAMES[lane.index]} refused {payment.cid.decode()} for good")
            else:
                self.duplicates += 1
            self.journal.append_quietly(record(b"X", seq))
        backlog = self.backlog
        if backlog.ready or backlog.pinned[DEFAULT] or backlog.pinned[FALLBACK]:
            self.pump_soon()  # a slot is free and something waits for one

    async def landed(self, low, high):
        """Wait (at most SUMMARY_WAIT_S) while an attempt whose requestedAt is in [low, high] and PROMISE_MARGIN_S old
        is under way: a slow processor stores it inside the promised window, where its own summary would count it."""
        high = min(high, now_ms() - int(self.config.promise_margin_s * 1000))
        deadline, flying = time.monotonic() + self.config.summary_wait_s, self.backlog.flying
        while time.monotonic() < deadline and any(low <= p.requested_ms <= high for p in flying.values()):
            await asyncio.sleep(0.005)

    def safe_below(self):
        """Per processor, a requestedAt no confirmation can come below: the oldest attempt that may land, else now."""
        safe = [now_ms(), now_ms()]
        for payment in itertools.chain(*self.backlog.pinned, self.backlog.flying.values()):
            safe[payment.processor] = min(safe[payment.processor], payment.requested_ms)
        return safe

    def compact_if_due(self):
        journal = self.journal
        if not journal.compacting and journal.end > max(self.config.journal_compact_bytes, 2 * journal.compacted):
            journal.compacting = True  # the state and the offset it matches, taken together:
            self.ledger.save()
            asyncio.get_running_loop().create_task(
                journal.compact(self.ledger.epoch, self.backlog.pending(), journal.end, list(self.recent.order)))

    async def check_pins(self):
        """Each PIN_CHECK_INTERVAL_S, look up payments pinned PIN_SETTLE_S to a down processor."""
        while self.running:
            await asyncio.sleep(self.config.pin_check_interval_s)
            now = time.monotonic()
            for lane in self.lanes:
                waiting = self.backlog.pinned[lane.index] if lane.breaker.state is not CLOSED else ()
                for payment in [p for p in waiting if now - p.settle_from >= self.config.pin_settle_s]:
                    if self.backlog.take_pinned(payment):  # not sent again, nor settled, meanwhile
                        self.settle(payment, lane, PINNED, await self.lookup(lane, payment.cid, payment.requested_ms))

    async def poll_health(self, lane):
        """GET /payments/service-health every HEALTH_INTERVAL_S (shared limit: 1 per 5 s)."""
        upstream, breaker = lane.upstream, lane.breaker
        while self.running:
            try:
                status, body = await upstream.request(b"GET", b"/payments/service-health", timeout=8.0)
                if status in (200, 503):  # newer processors answer 503 while failing
                    breaker.reported_failing = bool(orjson.loads(body).get("failing"))
                    breaker.observe(REPORTED_FAILING if breaker.reported_failing else REPORTED_OK, time.monotonic())
                    self.pump_soon()
                else:
                    log(f"health of {upstream.name}: status {status}")
            except (UpstreamError, orjson.JSONDecodeError, AttributeError) as error:
                log(f"health of {upstream.name}: {error}")
            await asyncio.sleep(self.config.health_interval_s)

    def in_flight(self):
        return self.lanes[DEFAULT].in_flight + self.lanes[FALLBACK].in_flight


# ---- Replication ----------------------------------------------------------
# Each instance streams its ledger's log to every peer and keeps a replica (a Ledger) of each peer's, so any instance
# answers a summary for the whole backend, its peers up or not (DESIGN.md). One exchange, POST /internal/replica:
#   request  "origin epoch offset total mine safe0 safe1 base kept_from ids\n", origin's log entries from offset on
#            (packed LOG_ENTRY), then `ids` 36-byte correlationIds origin accepted since the last exchange (the
#            receiver remembers them: a client's retry is not forwarded twice). total: origin's log length; mine: how
#            much of the receiver's log origin holds (-1: none); safe0, safe1: origin's Ledger.safe (a whole replica
#            freezes below it); base, kept_from: where origin's log and history start (retention dropped the rest)
#   answer   "receiver epoch held": how many entries of origin's log the receiver holds
# The receiver applies only entries from index held on (a resend never counts twice, a batch past a gap nothing);
# the sender goes on from held, or sends an empty batch at its log's end to learn it; told by `mine` that the sender
# lacks part of its log, the receiver sends at once. So after a restart (a log is a file; replay restores a lost
# last entry) each side learns where the other is. A log shorter than its replica (files lost) is taken again from
# 0, one whose base is past the replica's end from base. A purge starts a new epoch; older batches are ignored.
REPLICA_PATH = b"/internal/replica"


class PeerStream:
    """This instance's log as sent to one peer: how much it holds (`held`, of `epoch`; None: unknown), `ids` untold."""
    __slots__ = ("peer", "epoch", "held", "name", "answered", "ignored_by", "ids", "sent_at", "wake", "idle")

    def __init__(self, peer, heartbeat_s):
        self.peer, self.epoch, self.held, self.ids = peer, 0, None, bytearray()  # ids: 36 bytes each, oldest first
        self.name = None  # the peer's INSTANCE_ID, from its answers
        self.answered = None  # whether the last exchange got an answer; None before the first
        self.ignored_by = None  # the newer epoch the peer is at, once logged
        self.sent_at = -heartbeat_s  # time.monotonic() of the latest exchange
        self.wake = None  # the future the stream sleeps on between exchanges
        self.idle = False  # whether that sleep is the long one (nothing was left to send)


class Replication:
    """Streams the own ledger's log to the peers (PeerStream each) and keeps theirs as replicas."""

    def __init__(self, config, ledger, peers, recent=None, journal=None):
        self.config, self.origin, self.ledger = config, config.instance_id.encode(), ledger
        self.recent = recent  # the pipeline's RecentIds: ids accepted here or by a peer
        self.journal = journal  # where ids learnt from peers are kept across a restart
        directory, prefix = os.path.split(os.path.abspath(config.journal_path))
        kept = [name[len(prefix) + 9:-4].encode() for name in sorted(os.listdir(directory))  # peers' INSTANCE_IDs
                if name.startswith(prefix + ".replica-") and name.endswith(".log")]  # from before a restart
        self.replicas = {origin: Ledger(self.replica_path(origin), config.journal_fsync) for origin in kept}
        self.complete = set()  # origins whose whole log we have held since we started
        self.streams = [PeerStream(peer, config.replica_heartbeat_s) for peer in peers]
        self.batch = max(1, min(config.replica_batch, (config.max_body_bytes - 256) // LOG_ENTRY.size))
        self.started, self.is_ready, self.tasks = time.monotonic(), not peers, []

    def replica_path(self, origin):
        return f"{self.config.journal_path}.replica-{origin.decode()}"

    def start(self):
        self.tasks = [asyncio.ensure_future(self.stream(stream)) for stream in self.streams]

    async def stream(self, stream):
        """Send the peer what it lacks and the ids accepted here (again at once while behind); idle, a heartbeat."""
        loop, config = asyncio.get_running_loop(), self.config
        while True:
            busy = bool(stream.ids) or self.lacks(stream)
            due = busy or time.monotonic() - stream.sent_at >= config.replica_heartbeat_s
            try:
                if due and await self.exchange(stream):
                    continue
            except Exception as error:  # a bug must not end replication for good
                log(f"replication to {stream.peer.name} failed unexpectedly: {error!r}")
            stream.wake, stream.idle = loop.create_future(), not busy
            sleep = config.replica_interval_s if busy else config.replica_heartbeat_s
            timer = loop.call_later(sleep, self.nudge, stream)
            await stream.wake
            timer.cancel()

    def nudge(self, stream):
        if stream.wake is not None and not stream.wake.done():
            stream.wake.set_result(None)

    def nudge_idle(self):
        """Each tick: an idle stream with something new sends it now (it waits TICK_S, not a heartbeat)."""
        for stream in self.streams:
            if stream.idle and (stream.ids or self.lacks(stream)):
                self.nudge(stream)

    def lacks(self, stream):
        return stream.held is None or stream.epoch != self.ledger.epoch or stream.held < self.ledger.count()

    async def exchange(self, stream):
        """One batch to the peer; True if it answered and more should go at once (ids left, or entries it lacks)."""
        ledger, stream.sent_at = self.ledger, time.monotonic()
        epoch, total = ledger.epoch, ledger.count()
        known = stream.held is not None and stream.epoch == epoch
        offset = max(ledger.base, min(stream.held, total) if known else total)  # unknown: ask where it is
        ids = stream.ids
        del ids[:max(0, len(ids) - 36 * self.config.remembered_ids)]  # a peer away for long: only the latest matter
        sent_ids = min(len(ids), (self.config.max_body_bytes - 256) // 2 // 36 * 36)  # ids: half the room
        ids_left = len(ids) > sent_ids  # more than fit: the next batch goes at once
        end = min(total, offset + min(self.batch, (self.config.max_body_bytes - 256 - sent_ids) // LOG_ENTRY.size))
        replica = self.replicas.get(stream.name)
        mine = replica.count() if replica is not None and replica.epoch == epoch else -1
        body = b"%s %d %d %d %d %d %d %d %d %d\n%s%s" % (
            self.origin, epoch, offset, total, mine, *ledger.safe, ledger.base, ledger.kept_from, sent_ids // 36,
            ledger.read(offset, end), ids[:sent_ids])
        try:
            status, answer = await stream.peer.request(b"POST", REPLICA_PATH, body, b"", self.config.peer_timeout_s)
            if status != 200:
                raise UpstreamError(f"status {status}: {answer[:200]!r}")
            name, their_epoch, held = answer.split()
            their_epoch, held = int(their_epoch), int(held)
        except (UpstreamError, ValueError) as error:
            if stream.answered is not False:
                log(f"replication to {stream.peer.name} stopped: {error}")
            stream.answered = False  # the batch may have been applied: resent, it counts once
            return False
        if stream.answered is False:
            log(f"replication to {stream.peer.name} resumed at {held} of {total}")
        stream.answered, stream.name = True, name
        del ids[:sent_ids]
        if their_epoch != epoch or ledger.epoch != epoch:  # a purge here or there meanwhile
            stream.held = None
            if their_epoch > ledger.epoch and stream.ignored_by != their_epoch:
                stream.ignored_by = their_epoch
                log(f"{stream.peer.name} is at epoch {their_epoch}, we at {ledger.epoch} (a purge we "
                    f"missed?): it ignores our confirmations until the next purge")
            return False
        moved = not known or held > offset
        stream.epoch, stream.held = epoch, held
        return ids_left or (moved and held < ledger.count())

    async def stop(self):
        """Stop streaming, then send each answering peer what it lacks (within PEER_TIMEOUT_S): nothing unstreamed."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

        async def flush(stream):
            while await self.exchange(stream):
                pass
        flushes = asyncio.gather(*(flush(stream) for stream in self.streams), return_exceptions=True)
        try:
            await asyncio.wait_for(flushes, self.config.peer_timeout_s)  # cancels them when it times out
        except asyncio.TimeoutError:
            pass

    def receive(self, body):
        """Apply one batch from a peer; the answer's body. InvalidRequest if malformed."""
        head, newline, payload = body.partition(b"\n")
        try:
            origin, *numbers = head.split()
            epoch, offset, total, mine, safe_default, safe_fallback, base, kept_from, count = map(int, numbers)
        except ValueError:
            raise InvalidRequest("expected 'origin epoch offset total mine safe safe base kept_from ids' "
                                 "and a newline") from None
        at = len(payload) - 36 * count
        if not newline or count < 0 or at < 0 or at % LOG_ENTRY.size:
            raise InvalidRequest("entries must be whole int64 triples, then the ids")
        ids = [payload[i:i + 36] for i in range(at, len(payload), 36)]
        if not all(UUID_BYTES.fullmatch(cid) for cid in ids):
            raise InvalidRequest("ids must be 36-byte correlationIds")
        entries = array.array("q", payload[:at])
        if origin == self.origin or not re.fullmatch(rb"[\w.-]{1,64}", origin):
            raise InvalidRequest("a peer's INSTANCE_ID must be its own: letters, digits, '_', '.', '-'")
        if offset < 0 or offset + len(entries) // 3 > total or not all(p in (0, 1) for p in entries[::3]):
            raise InvalidRequest("entries out of range")
        if ids:  # accepted by the peer: a client's retry that reaches us is not forwarded again
            for cid in ids:
                self.recent.add(cid)
            self.journal.append_quietly(b"".join(record(b"I", cid) for cid in ids))  # else remembered until a restart
        replica = self.replicas.get(origin)
        if replica is None:
            replica = self.replicas[origin] = Ledger(self.replica_path(origin), self.config.journal_fsync)
            replica.clear(self.ledger.epoch)
        if epoch > replica.epoch or (epoch == replica.epoch and total < replica.count()):
            replica.clear(epoch)  # a purge we have not heard of yet, or its journal was lost
            self.complete.discard(origin)
        if epoch == replica.epoch and replica.count() < base:  # the origin dropped what we lack
            replica.clear(epoch, base, kept_from)
        if epoch == replica.epoch:
            held = replica.count()
            if offset <= held < offset + len(entries) // 3:
                replica.extend(payload[LOG_ENTRY.size * (held - offset):at])
            if replica.count() >= total:  # all of it: nothing will come below the origin's safe
                replica.safe = [safe_default, safe_fallback]
                self.complete.add(origin)
        for stream in self.streams:  # the sender lacks part of our log (restarted): send now
            if (stream.name in (origin, None) and epoch == self.ledger.epoch
                    and (stream.held is None or mine < stream.held)):
                stream.held = None
                self.nudge(stream)
        return b"%s %d %d" % (self.origin, replica.epoch, replica.count())

    def purge(self, epoch):
        for ledger in (self.ledger, *self.replicas.values()):
            ledger.clear(epoch)
        for stream in self.streams:
            stream.held = None
            self.nudge(stream)

    def ready(self):
        """Whether this instance holds every answering peer's whole log, or has waited REPLICA_READY_MAX_S."""
        if not self.is_ready:
            self.is_ready = time.monotonic() - self.started >= self.config.replica_ready_max_s or all(
                stream.answered is False or (stream.answered and stream.name in self.complete)
                for stream in self.streams)
            if self.is_ready:
                log("replicas complete: ready")
        return self.is_ready


READY = tuple((response(status, body, b"text/plain"), response(status, body, b"text/plain", close=True))
              for status, body in ((b"503 Service Unavailable", b"replicas incomplete"), (b"200 OK", b"ready")))


def post_replica(connection, request, body, keep):
    answer = connection.server.replication.receive(body)
    return connection.answer(response(b"200 OK", answer, b"text/plain", close=not keep), keep)


def get_ready(connection, request, body, keep):
    return connection.answer(READY[connection.server.replication.ready()][not keep], keep)


# ---- Server ---------------------------------------------------------------
# One HttpConnection per client connection parses requests and answers each in order, within the limits. Only the
# summary and the purge, which ask the peers, answer asynchronously; reading pauses while they run.
POST_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


class Server:
    """Shared state of the HTTP side: the pipeline, peers, open connections, counters."""

    def __init__(self, config, pipeline, peers):
        self.config, self.origin, self.pipeline, self.peers = config, config.instance_id.encode(), pipeline, peers
        self.max_cents = int(config.max_amount * 100)
        self.replication = Replication(config, pipeline.ledger, peers, pipeline.recent, pipeline.journal)
        pipeline.outboxes = [stream.ids for stream in self.replication.streams]
        self.connections, self.draining = set(), False
        self.started = self.last_tick = time.monotonic()
        self.gc_pauses, self.gc_started = [0, 0.0, 0.0], 0.0  # collections, total seconds, longest seconds
        self.post_seconds = [0] * (len(POST_BUCKETS_S) + 1)  # histogram of POST /payments; last: +Inf
        self.post_seconds_sum = self.lag_now = self.loop_lag = 0.0  # lag: longest in this second, in the last
        self.ticks, self.ticker, self.resumed_at = 0, None, -1e9  # resumed_at: when a tick found the loop had stalled

    def tick(self, due):
        """Every TICK_S (`due`: when it should have run; how late it ran is the loop's lag); once a second, the rest."""
        self.last_tick = now = time.monotonic()
        self.ticker = asyncio.get_running_loop().call_later(self.config.tick_s, self.tick, now + self.config.tick_s)
        late = max(0.0, now - due)
        self.lag_now = max(self.lag_now, late)
        if late > self.config.stall_s:
            self.resumed_at = self.last_tick
        self.replication.nudge_idle()
        ledgers = (self.pipeline.ledger, *self.replication.replicas.values())
        for ledger in ledgers:
            ledger.flush()
        self.ticks += 1
        if self.ticks * self.config.tick_s >= 1.0:
            self.ticks = 0
            self.pipeline.ledger.safe = self.pipeline.safe_below()
            cut = now_ms() - int(self.config.history_retention_s * 1000) if self.config.history_retention_s else None
            for ledger in ledgers:
                try:
                    ledger.freeze(cut)
                except OSError as error:  # a full disk: the tail stays in memory, tried again next second
                    log(f"ledger not frozen: {error}")
            self.loop_lag, self.lag_now = self.lag_now, 0.0
            self.sweep()
            self.pipeline.journal.retry_reserve()
            self.pipeline.compact_if_due()

    def on_gc(self, phase, info):
        if phase == "start":
            self.gc_started = time.perf_counter()
        else:
            pause, (count, total, longest) = time.perf_counter() - self.gc_started, self.gc_pauses
            self.gc_pauses = [count + 1, total + pause, max(longest, pause)]

    def sweep(self):
        now = time.monotonic()
        for connection in list(self.connections):
            connection.check_deadline(now)

    async def summary(self, low, high):
        """The whole backend's totals: the own ledger, and each peer's as it answers now (GET /internal/summary) or
        else its replica, after waiting for attempts that may store inside the window. So it counts all any answering
        instance held when asked, never less than the answer before while every instance answers."""
        kept_from = max(ledger.kept_from for ledger in (self.pipeline.ledger, *self.replication.replicas.values()))
        if low < kept_from:
            raise HistoryDropped(f"payments before {iso_ms(kept_from).decode()} are no longer kept "
                                 f"(HISTORY_RETENTION_S): ask from then on")
        path = b"/internal/summary?from=%d&to=%d" % (low, high)
        asked = self.peers if self.config.peer_summary_timeout_s > 0 else ()  # 0: the replicas alone
        *answers, _ = await asyncio.gather(*(self.ask_fresh(peer, path) for peer in asked),
                                           self.pipeline.landed(low, high))
        totals = self.totals(low, high, dict(answer for answer in answers if answer is not None))
        return SUMMARY_BODY % (totals[0], cents_text(totals[1]), totals[2], cents_text(totals[3]))

    async def own_summary(self, query):
        """GET /internal/summary?from=ms&to=ms (asked by a peer): "origin epoch count cents count cents"."""
        try:
            values = dict(parse_qsl(query.decode("latin-1")))
            low, high = int(values["from"]), int(values["to"])
        except (KeyError, ValueError):
            raise InvalidRequest("from and to must be integers (ms)") from None
        await self.pipeline.landed(low, high)
        ledger = self.pipeline.ledger
        return b"%s %d %d %d %d %d" % (self.origin, ledger.epoch, *ledger.totals(low, high))

    async def ask_fresh(self, peer, path):
        """(origin, totals) of a peer's own ledger now; None if it does not answer in time or is at another epoch."""
        try:
            timeout = self.config.peer_summary_timeout_s + self.config.summary_wait_s  # it may wait for its attempts
            status, body = await asyncio.wait_for(peer.request(b"GET", path, b"", b"", timeout), timeout)
            origin, epoch, *numbers = body.split()
            if status != 200 or int(epoch) != self.pipeline.ledger.epoch or len(numbers) != 4:
                return None
            return origin, [int(number) for number in numbers]
        except (UpstreamError, asyncio.TimeoutError, ValueError):
            return None

    def totals(self, low, high, fresh):
        """[default count, cents, fallback count, cents]: the own ledger, plus each peer's fresh answer or replica."""
        parts = [fresh.pop(origin, None) or replica.totals(low, high)
                 for origin, replica in self.replication.replicas.items()]
        own = self.pipeline.ledger.totals(low, high)
        return [sum(column) for column in zip(own, *parts, *fresh.values())]  # fresh.values(): peers with no replica

    async def purge(self, request):
        if not self.config.purge_token:
            raise Forbidden("purge is disabled: set PURGE_TOKEN")
        if request.token != self.config.purge_token.encode():
            raise Forbidden("wrong or missing X-Rinha-Token")
        epoch = max(now_ms(), self.pipeline.ledger.epoch + 1)  # a new epoch, the same everywhere
        self.purge_local(epoch)
        path, headers = b"/internal/purge?epoch=%d" % epoch, b"X-Rinha-Token: %s\r\n" % request.token
        answers = await asyncio.gather(*(peer.request(b"POST", path, b"", headers, self.config.peer_timeout_s)
                                         for peer in self.peers), return_exceptions=True)
        for peer, answer in zip(self.peers, answers):  # every peer, or PeerUnavailable: never a silent part
            if isinstance(answer, BaseException) or answer[0] != 200:
                detail = answer if isinstance(answer, BaseException) else f"status {answer[0]}"
                raise PeerUnavailable(f"peer {peer.name} unavailable: {detail}")

    def purge_local(self, epoch):
        self.replication.purge(epoch)
        self.pipeline.recent.reset(entry[0] for entry in self.pipeline.backlog.pending().values())
        self.pipeline.journal.append_quietly(record(b"P", epoch))
        log(f"ledger and replicas purged: epoch {epoch}")

    def health(self):
        pipeline, now = self.pipeline, time.monotonic()

        def processor(lane):
            breaker = lane.breaker
            count, cents = pipeline.ledger.window(lane.index, -(1 << 62), 1 << 62)
            return {"confirmed": lane.confirmed, "failed_attempts": lane.failed,
                    "breaker": breaker.state, "reported_failing": breaker.reported_failing,
                    "down_for_s": round(breaker.down_for(now), 3), "in_flight": lane.in_flight,
                    "in_flight_limit": lane.limit, "latency_ms": round(lane.latency * 1000, 3),
                    "keeps_promise": lane.keeping, "stored_latency_ms": round(lane.promise_latency * 1000, 3),
                    "ledger_requests": count, "ledger_amount": cents / 100}
        backlog, in_flight, gc_pauses = pipeline.backlog, pipeline.in_flight(), self.gc_pauses
        return orjson.dumps({
            "queue": backlog.unsettled() - in_flight, "in_flight": in_flight, "pinned": backlog.pins(),
            "accepted": pipeline.accepted, "duplicates": pipeline.duplicates, "rejected": pipeline.rejected,
            "default": processor(pipeline.lanes[DEFAULT]), "fallback": processor(pipeline.lanes[FALLBACK]),
            "journal_bytes": pipeline.journal.end, "instance": self.config.instance_id,
            "uptime_s": round(now - self.started, 1), "connections": len(self.connections),
            "replicas": {origin.decode(): replica.count() for origin, replica in self.replication.replicas.items()},
            "gc": {"collections": gc_pauses[0], "total_ms": round(gc_pauses[1] * 1000, 3),
                   "longest_ms": round(gc_pauses[2] * 1000, 3)},
            "loop_lag_ms": round(self.loop_lag * 1000, 3)})

    def metrics(self):
        """The Prometheus text exposition format (version 0.0.4)."""
        pipeline, lanes, out = self.pipeline, self.pipeline.lanes, []

        def metric(name, kind, text, *samples):  # samples: (labels, value)
            out.append(f"# HELP rinha_{name} {text}\n# TYPE rinha_{name} {kind}\n")
            out.extend(f"rinha_{name}{labels} {value}\n" for labels, value in samples)

        def per_lane(attribute):
            return [(f'{{processor="{name}"}}', getattr(lane, attribute)) for name, lane in zip(PROCESSOR_NAMES, lanes)]
        metric("payments_accepted_total", "counter", "POST /payments answered 202.", ("", pipeline.accepted))
        metric("payments_confirmed_total", "counter", "Payments a processor confirmed.", *per_lane("confirmed"))
        metric("attempts_failed_total", "counter", "Attempts that taught the breaker a failure.", *per_lane("failed"))
        metric("payments_not_ours_total", "counter", "Payments settled uncounted.",
               ('{reason="duplicate"}', pipeline.duplicates), ('{reason="rejected"}', pipeline.rejected))
        metric("queue_depth", "gauge", "Accepted payments waiting (pinned ones included).",
               ("", pipeline.backlog.unsettled() - pipeline.in_flight()))
        metric("pinned", "gauge", "Payments pinned to a processor.", ("", pipeline.backlog.pins()))
        metric("in_flight", "gauge", "Attempts under way.", *per_lane("in_flight"))
        metric("in_flight_limit", "gauge", "Attempts allowed at once.", *per_lane("limit"))
        metric("processor_latency_seconds", "gauge", "Moving average of answered attempts.", *per_lane("latency"))
        metric("processor_keeps_promise", "gauge", "1 while payments sent there are stored within the margin.",
               *[(labels, int(keeping)) for labels, keeping in per_lane("keeping")])
        metric("breaker_state", "gauge", "1 for the breaker's current state.",
               *[(f'{{processor="{name}",state="{state}"}}', int(lane.breaker.state is state))
                 for name, lane in zip(PROCESSOR_NAMES, lanes) for state in (CLOSED, OPEN, HALF_OPEN)])
        metric("journal_bytes", "gauge", "Size of the journal file.", ("", pipeline.journal.end))
        metric("connections", "gauge", "Open client connections.", ("", len(self.connections)))
        metric("event_loop_lag_seconds", "gauge", "Longest event-loop lag in the last second.", ("", self.loop_lag))
        counts = list(itertools.accumulate(self.post_seconds))
        metric("post_payments_seconds", "histogram",
               "POST /payments, from the read that completed it to the answer written.",
               *[(f'_bucket{{le="{bound}"}}', count) for bound, count in zip((*POST_BUCKETS_S, "+Inf"), counts)],
               ("_sum", self.post_seconds_sum), ("_count", counts[-1]))
        metric("gc_collections_total", "counter", "Garbage collections.", ("", self.gc_pauses[0]))
        metric("gc_pause_seconds_total", "counter", "Time spent in garbage collections.", ("", self.gc_pauses[1]))
        metric("gc_pause_seconds_max", "gauge", "Longest garbage collection.", ("", self.gc_pauses[2]))
        return "".join(out).encode()


class HttpConnection(asyncio.Protocol):
    __slots__ = ("server", "transport", "buffer", "head", "request_since", "active_at",
                 "busy", "paused_since", "linger", "discarded")

    def __init__(self, server):
        self.server, self.transport, self.buffer = server, None, bytearray()
        self.head = None  # the parsed head of a request whose body is still arriving
        self.request_since = self.paused_since = 0.0  # when the unfinished request began; when writing paused (0: not)
        self.active_at = time.monotonic()
        self.busy = False  # an asynchronous answer is being prepared
        self.linger = None  # once the last answer is written: the timer that ends the close
        self.discarded = 0  # bytes read and dropped since then

    def connection_made(self, transport):
        self.transport = transport
        if len(self.server.connections) >= self.server.config.max_connections:
            return self.refuse(Unavailable("too many connections"))
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
            if self.discarded > self.server.config.linger_bytes:
                self.transport.abort()
            return
        self.buffer += data
        self.active_at = now = time.monotonic()
        server = self.server
        if now - server.last_tick > server.config.stall_s or now - server.resumed_at < server.config.tick_s:
            # The loop stood still (SIGSTOP, a stall) and this arrived meanwhile (read before the first tick after,
            # or within a tick of it): the load balancer may have given up and sent it to a peer, which took it.
            # Taking it here too could forward one payment twice: refuse it, it was never ours.
            return self.refuse(RetryLater("this instance stalled; retry"))
        if not self.request_since:
            self.request_since = self.active_at
        if not self.busy:
            self.process()

    def process(self):
        buffer, limit = self.buffer, self.server.config.max_header_bytes
        request = None
        try:
            while buffer and not self.transport.is_closing():
                request = self.head
                if request is None:
                    end = buffer.find(b"\r\n\r\n")
                    if end < 0 or end > limit:
                        if end > limit or len(buffer) > limit + 3:
                            return self.refuse(HeadersTooLarge(f"request head over {limit} bytes"))
                        return
                    try:
                        request = parse_head(bytes(buffer[:end]), self.server.config.max_body_bytes)
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
                raise MethodNotAllowed("method not allowed", extra=b"Allow: %s\r\n" % method)
            return handler(self, request, body, keep)
        except HttpError as error:
            return self.answer(error.response(not keep), keep and not error.closes)

    def post_payment(self, request, body, keep):
        server = self.server
        cid, cents = parse_payment(body, server.max_cents)
        server.pipeline.accept(cid, cents)
        keep = self.answer(ACCEPTED[not keep], keep)
        seconds = time.monotonic() - self.active_at
        server.post_seconds[bisect.bisect_left(POST_BUCKETS_S, seconds)] += 1
        server.post_seconds_sum += seconds
        return keep

    def get_summary(self, request, body, keep):
        return self.answer_later(self.server.summary(*parse_window(request.query)), request, keep)

    def get_own_summary(self, request, body, keep):
        return self.answer_later(self.server.own_summary(request.query), request, keep)

    def post_purge(self, request, body, keep):
        return self.answer_later(self.server.purge(request), request, keep, PURGED)

    def post_local_purge(self, request, body, keep):
        if not self.server.config.purge_token or request.token != self.server.config.purge_token.encode():
            raise Forbidden("wrong or missing X-Rinha-Token")
        try:
            epoch = int(dict(parse_qsl(request.query.decode("latin-1")))["epoch"])
        except (KeyError, ValueError):
            raise InvalidRequest("epoch must be an integer") from None
        self.server.purge_local(epoch)
        return self.answer(PURGED[not keep], keep)

    def get_metrics(self, request, body, keep):
        return self.answer(response(b"200 OK", self.server.metrics(), b"text/plain; version=0.0.4",
                                    close=not keep), keep)

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
        asyncio.ensure_future(work).add_done_callback(lambda done: self.finish_later(done, request, keep, fixed))
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
        """Answer an HttpError and close (a framing error: nothing of the stream is trusted after it)."""
        self.close_after(error.response(close=True))

    def fail(self, error, line):
        """A bug: log it with the request's first line and where it was raised, answer 500, close this connection."""
        frame = error.__traceback__
        while frame is not None and frame.tb_next is not None:
            frame = frame.tb_next
        where = f" at line {frame.tb_lineno} in {frame.tb_frame.f_code.co_name}" if frame else ""
        log(f"internal error{where} on {line[:200]!r}: {error!r}")
        self.refuse(InternalError("internal error"))

    def close_after(self, data):
        """Write the last answer, then a lingering close: shut our sending side and drop what the client still sends
        (LINGER_BYTES, LINGER_S) first, as closing on unread bytes would reset the connection and lose the answer."""
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
        self.linger = asyncio.get_running_loop().call_later(self.server.config.linger_s, transport.abort)

    def check_deadline(self, now):
        if self.linger is not None:
            return  # its own timer ends it
        config = self.server.config
        if self.request_since and now - self.request_since > config.read_timeout_s and not self.busy:
            self.refuse(RequestTimeout(f"request not received within {config.read_timeout_s} s"))
        elif self.paused_since and now - self.paused_since > config.read_timeout_s:
            self.transport.abort()  # the client stopped reading its answers
        elif not self.request_since and not self.busy and (
                now - self.active_at > config.idle_timeout_s or self.server.draining):
            self.transport.close()


ROUTES = {  # path -> (the one method it answers, handler)
    b"/payments": (b"POST", HttpConnection.post_payment),
    b"/payments-summary": (b"GET", HttpConnection.get_summary),
    b"/purge-payments": (b"POST", HttpConnection.post_purge),
    b"/health": (b"GET", HttpConnection.get_health),
    b"/metrics": (b"GET", HttpConnection.get_metrics),
    b"/internal/purge": (b"POST", HttpConnection.post_local_purge),  # asked by peers
    b"/internal/summary": (b"GET", HttpConnection.get_own_summary),  # asked by peers
    REPLICA_PATH: (b"POST", post_replica),  # sent by peers
    b"/internal/ready": (b"GET", get_ready),  # the load balancer's check
}


# ---- Main -----------------------------------------------------------------
# Replays the journal, starts listeners, workers and pollers, then waits for SIGTERM: stop accepting, finish
# requests, drain the queue for SHUTDOWN_GRACE_S, exit. What is still queued stays in the journal for the next start.
async def serve(config, stop=None, started=None):
    """Run one instance until SIGTERM/SIGINT, or (the tests) until `stop` is done; started(server) once listening."""
    LOG.name = config.instance_id
    loop = asyncio.get_running_loop()
    ledger = Ledger(config.journal_path + ".ledger", config.journal_fsync)
    journal, recent = Journal(config.journal_path, config), RecentIds(config.remembered_ids)
    pending, next_seq = journal.replay(ledger, recent)
    journal.open_compacted(ledger, pending, list(recent.order))
    pipeline = Pipeline(config, journal, ledger, pending, next_seq, recent)
    if pending:
        log(f"journal replayed: {len(pending)} payments requeued")
    peers = [Upstream(url, url, config.peer_timeout_s) for url in config.peers.split(",") if url.strip()]
    server = Server(config, pipeline, peers)

    listeners = []
    for address in filter(None, (part.strip() for part in config.listen.split(","))):
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
    tasks = [asyncio.ensure_future(pipeline.check_pins())]
    server.replication.start()
    if config.health_interval_s > 0:
        tasks += [asyncio.ensure_future(pipeline.poll_health(lane)) for lane in pipeline.lanes]
    pipeline.pump()
    server.ticker = loop.call_later(config.tick_s, server.tick, time.monotonic() + config.tick_s)

    if stop is None:
        stop = loop.create_future()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))

    gc.collect()
    gc.freeze()  # everything allocated so far lives for the whole run: keep it out of every collection
    gc.callbacks.append(server.on_gc)
    log(f"listening on {config.listen}; peers: {config.peers or 'none'}; "
        f"{pipeline.backlog.unsettled()} payments requeued")
    if started is not None:
        started(server)
    await stop

    log("stopping: no new connections; draining the queue")
    server.draining = True
    for listener in listeners:
        listener.close()
    server.sweep()
    deadline = loop.time() + config.shutdown_grace_s
    while pipeline.backlog.unsettled() and loop.time() < deadline:
        await asyncio.sleep(0.05)
    await server.replication.stop()
    pipeline.running = False
    server.ticker.cancel()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for upstream in (*(lane.upstream for lane in pipeline.lanes), *peers):
        upstream.close()
    gc.callbacks.remove(server.on_gc)
    os.close(journal.fd)
    for ledger in (ledger, *server.replication.replicas.values()):
        ledger.save()
        ledger.close()
    log(f"stopped; {pipeline.backlog.unsettled()} payments left in the journal for the next start")


def main():
    # glibc's heap keeps the holes of large freed blocks (RSS grew in steps, bench/RESULTS.md): mmap them
    LIBC.mallopt(-3, 131072)  # M_MMAP_THRESHOLD
    uvloop.run(serve(Config.from_env()))


if __name__ == "__main__":
    main()
