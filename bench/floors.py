"""The floors rinha.py is measured against, in one module: servers that do less than rinha.py.

- FloorServer: haproxy alone, configured as haproxy.cfg (same global and defaults sections) but
  answering a fixed 202 itself with nothing behind it, in a cgroup limited like the stack (1.5
  CPU / 350 MB) when the limits can be applied. What k6, haproxy and this machine cost
  (bench/capacity.py, bench/floor.py --behind none).
- The null instance (`python -m bench.floors null`): stands in for rinha.py behind the real
  haproxy.cfg (bench/floor.py --behind null). It speaks just enough HTTP/1.1 on the same unix
  socket (LISTEN=unix:/path) for the contest's k6 script and haproxy's check, answers every
  request at once from fixed bytes, and keeps, journals and forwards nothing. POST -> 202 (200
  for a purge), GET /payments-summary -> zeros, any other GET -> 200. What rinha costs above
  this is its own work: parsing, journaling, forwarding, replicating.
- The micro app (`python -m bench.floors micro --port 18080 [--host 127.0.0.1]`): POST /payments
  written the mainstream way, as a yardstick for rinha.py's hot path. A Starlette app on uvicorn
  (one worker, no access log): parse the JSON body, validate it with the same rules as rinha.py
  (a JSON object; correlationId a UUID string; amount a number over 0.00 and at most
  1,000,000,000, rounded half to even to cents), append it to an in-memory list and answer 202.
  bench/bench.py runs it next to rinha.py under the same wrk load.

The servers import what they run on (uvloop; starlette and uvicorn) only when they start.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

from bench.common import REPO, free_port, http_request

# The command line of the null instance (after the interpreter), run from the repository's root.
NULL_INSTANCE = ("-m", "bench.floors", "null")
MICRO_APP = ("-m", "bench.floors", "micro")


class FloorError(RuntimeError):
    """The floor did not start."""


# ---------------------------------------------------------------------------
# haproxy alone answering 202
# ---------------------------------------------------------------------------

def floor_config(port):
    """haproxy.cfg's global and defaults sections, and a frontend that answers 202 itself."""
    text = (REPO / "haproxy.cfg").read_text()
    head = text[:re.search(r"^frontend ", text, re.M).start()]
    return head + (f"frontend floor\n    bind 127.0.0.1:{port}\n"
                   "    http-request return status 202\n")


class FloorServer:
    """haproxy answering a fixed 202 on a free port, limited like the stack when possible."""

    def __init__(self, log=print):
        self.log = log
        self.proc = None
        self.cgroups = None
        self.limits_reason = None
        self.dir = None
        self.url = None
        self.log_file = None

    def start(self):
        from bench.arena import CPU_LIMIT, MEMORY_LIMIT, Cgroups, _preexec, ensure_lb_binary
        exe = ensure_lb_binary("haproxy", self.log)
        port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="rinha-floor-"))
        config = self.dir / "haproxy.cfg"
        config.write_text(floor_config(port))
        parents, reason = Cgroups.probe()
        procs = ()
        if parents:
            # The arena's naming, so that arena.py removes it if this process is killed.
            cg = Cgroups(f"rinha-arena-{port}-{os.getpid()}-{secrets.token_hex(3)}")
            try:
                cg.create(parents, CPU_LIMIT, MEMORY_LIMIT)
                self.cgroups, procs, reason = cg, cg.procs_files(), "applied"
            except OSError as error:
                reason = f"cannot create cgroup: {error}"
        self.limits_reason = reason
        self.log_file = open(self.dir / "haproxy.log", "w")
        self.proc = subprocess.Popen([exe, "-db", "-f", str(config)], stdin=subprocess.DEVNULL, stdout=self.log_file,
                                     stderr=subprocess.STDOUT, preexec_fn=_preexec(procs))
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while True:
            try:
                if http_request(self.url, "POST", "/payments", body=b"{}")[0] == 202:
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise FloorError(f"haproxy (floor) did not answer 202 on {self.url}")
            time.sleep(0.05)

    def cpu_s(self):
        from bench.arena import Cgroups
        return Cgroups.read_stats(self.cgroups.dirs)["cpu_usage_s"] if self.cgroups else None

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.cgroups:
            self.cgroups.remove()
        if self.log_file:
            self.log_file.close()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------
# The null instance
# ---------------------------------------------------------------------------

ACCEPTED = b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"
PURGED = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n{"message":"purged"}'
SUMMARY_BODY = (b'{"default":{"totalRequests":0,"totalAmount":0},'
                b'"fallback":{"totalRequests":0,"totalAmount":0}}')
SUMMARY = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
           % (len(SUMMARY_BODY), SUMMARY_BODY))
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class NullConnection(asyncio.Protocol):
    __slots__ = ("transport", "buffer")

    def connection_made(self, transport):
        self.transport = transport
        self.buffer = bytearray()

    def data_received(self, data):
        buffer = self.buffer
        buffer += data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            at = buffer.lower().find(b"content-length:", 0, end)
            length = int(buffer[at + 15:buffer.find(b"\r\n", at)]) if at >= 0 else 0
            if len(buffer) < end + 4 + length:
                return
            line = bytes(buffer[:buffer.find(b"\r\n")])
            del buffer[:end + 4 + length]
            if line.startswith(b"POST "):
                self.transport.write(PURGED if b"purge" in line else ACCEPTED)
            elif line.startswith(b"GET /payments-summary"):
                self.transport.write(SUMMARY)
            else:
                self.transport.write(OK)


async def serve_null():
    path = os.environ["LISTEN"].removeprefix("unix:")
    if os.path.exists(path):
        os.unlink(path)
    server = await asyncio.get_running_loop().create_unix_server(NullConnection, path, backlog=4096)
    os.chmod(path, 0o666)
    print(f"null instance listening on {path}", flush=True)
    async with server:
        await server.serve_forever()


def run_null():
    import uvloop

    uvloop.run(serve_null())


# ---------------------------------------------------------------------------
# The micro app: POST /payments in Starlette on uvicorn
# ---------------------------------------------------------------------------

UUID_PATTERN = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
MAX_AMOUNT = Decimal("1000000000")
CENT = Decimal("0.01")


def micro_app():
    """The Starlette app: POST /payments and GET /health."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    payments = []

    def bad_request(message):
        return JSONResponse({"error": message}, status_code=400)

    async def create_payment(request):
        try:
            payment = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return bad_request("body is not valid JSON")
        if not isinstance(payment, dict):
            return bad_request("body must be a JSON object")
        cid = payment.get("correlationId")
        if not isinstance(cid, str) or len(cid) != 36 or not UUID_PATTERN.fullmatch(cid):
            return bad_request("correlationId must be a UUID string")
        amount = payment.get("amount")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount != amount \
                or amount in (float("inf"), float("-inf")):
            return bad_request("amount must be a number")
        cents = int(Decimal(repr(amount)).quantize(CENT, ROUND_HALF_EVEN) * 100)
        if cents <= 0 or cents > MAX_AMOUNT * 100:
            return bad_request("amount must be over 0.00 and at most 1000000000")
        payments.append((cid, cents))
        return Response(status_code=202)

    async def health(request):
        return JSONResponse({"payments": len(payments)})

    return Starlette(routes=[
        Route("/payments", create_payment, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ])


def run_micro(host, port):
    import uvicorn

    uvicorn.run(micro_app(), host=host, port=port, workers=1, access_log=False, log_level="warning")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="server", required=True)
    sub.add_parser("null", help="the null instance, on the unix socket named by $LISTEN (unix:/path)")
    micro = sub.add_parser("micro", help="mainstream POST /payments (Starlette + uvicorn)")
    micro.add_argument("--host", default="127.0.0.1")
    micro.add_argument("--port", type=int, default=18080)
    args = parser.parse_args(argv)
    if args.server == "null":
        run_null()
    else:
        run_micro(args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
