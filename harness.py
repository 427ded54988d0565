"""The test harness shared by test_rinha.py and conftest.py: child processes (rinha.py, the
processor emulator bench/processor.py) on free ports, plain HTTP and raw-socket clients,
waiting on a condition, and the checks most tests end with. The fixtures that start and stop
these processes are in conftest.py."""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PYTHON = sys.executable
TOKEN = "123"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Process:
    """A child process whose stderr is collected; waits for a line saying it is ready."""

    def __init__(self, args, ready, env=None):
        self.lines = []
        self.popen = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                      env={**os.environ, **(env or {})}, cwd=ROOT)
        self.ready = threading.Event()
        threading.Thread(target=self.read, args=(ready,), daemon=True).start()
        if not self.ready.wait(15):
            self.stop()
            raise RuntimeError(f"{args} not ready:\n" + "".join(self.lines))

    def read(self, ready):
        for raw in self.popen.stderr:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            if ready in line:
                self.ready.set()

    def output(self):
        return "".join(self.lines)

    def stop(self, sig=signal.SIGTERM, timeout=20):
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


class Processor:
    """bench/processor.py on a free port (or on `port`, to restart one where it was), or on the
    unix socket `unix` (then only its url is of use: the admin calls need a port)."""

    def __init__(self, fee, *extra, port=None, unix=None):
        self.port = None if unix else port or free_port()
        self.url = f"unix:{unix}" if unix else f"http://127.0.0.1:{self.port}"
        where = ["--unix", str(unix)] if unix else ["--port", str(self.port)]
        self.process = Process([PYTHON, str(ROOT / "bench" / "processor.py"), *where,
                                "--fee", fee, "--token", TOKEN, *extra], "listening")

    def admin(self, method, path, body=None):
        return call(self.port, method, path, body, {"X-Rinha-Token": TOKEN})

    def configure(self, delay=None, failure=None):
        if delay is not None:
            assert self.admin("PUT", "/admin/configurations/delay", {"delay": delay})[0] == 200
        if failure is not None:
            assert self.admin("PUT", "/admin/configurations/failure", {"failure": failure})[0] == 200

    def reset(self):
        self.configure(delay=0, failure=False)
        assert self.admin("POST", "/admin/purge-payments")[0] == 200

    def summary(self, query=""):
        status, _, body = self.admin("GET", "/admin/payments-summary" + query)
        assert status == 200
        return json.loads(body)

    def stored(self, cid):
        return call(self.port, "GET", f"/payments/{cid}")[0] == 200


class Instance:
    """rinha.py on a free port (and optionally a unix socket), journal in a temp dir;
    `code`, if given, is run instead (it imports rinha, patches it and calls rinha.main())."""

    def __init__(self, tmp, name="api1", default=None, fallback=None, port=None, code=None, **env):
        self.port = port or free_port()
        self.name = name
        self.args = [PYTHON, "-c", code] if code else [PYTHON, str(ROOT / "rinha.py")]
        self.journal = str(tmp / f"{name}.journal")
        self.env = {"LISTEN": f"127.0.0.1:{self.port}", "INSTANCE_ID": name, "JOURNAL_PATH": self.journal,
                    "DEFAULT_PROCESSOR_URL": default.url if default else "http://127.0.0.1:9",
                    "FALLBACK_PROCESSOR_URL": fallback.url if fallback else "http://127.0.0.1:9",
                    "HEALTH_INTERVAL_S": "0", "SHUTDOWN_GRACE_S": "3", "PURGE_TOKEN": "",
                    **{key: str(value) for key, value in env.items()}}
        self.start()

    def start(self):
        self.process = Process(self.args, "listening on", self.env)

    def health(self):
        return json.loads(call(self.port, "GET", "/health")[2])

    def summary(self, query=""):
        status, _, body = call(self.port, "GET", "/payments-summary" + query)
        assert status == 200, body
        return json.loads(body)

    def pay(self, cid=None, amount=19.90):
        cid = cid or str(uuid.uuid4())
        return call(self.port, "POST", "/payments", {"correlationId": cid, "amount": amount})[0], cid


def call(port, method, path, body=None, headers=None, timeout=10):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        connection.request(method, path, body=data, headers=headers or {})
        answer = connection.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()
    finally:
        connection.close()


def raw(port, data, wait=1.0):
    """Send bytes, read until the server closes or goes quiet for `wait` seconds."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except socket.timeout:
            pass
        return b"".join(chunks)


def wait_until(predicate, timeout=15.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def drained(instance):
    health = instance.health()
    return health["queue"] == 0 and health["in_flight"] == 0


def assert_ledger_matches(instance, default, fallback, query=""):
    """The backend's summary equals what the processors recorded, to the cent."""
    mine = instance.summary(query)
    for name, processor in (("default", default), ("fallback", fallback)):
        theirs = processor.summary(query)
        assert mine[name]["totalRequests"] == theirs["totalRequests"], (name, mine, theirs)
        assert Decimal(str(mine[name]["totalAmount"])) == Decimal(str(theirs["totalAmount"])), (name, mine, theirs)
    return mine


def send_payments(instance, count, threads=8):
    """POST `count` payments concurrently. Returns (accepted, failed): the ids that got a 2xx,
    and for every other payment its status or the name of the exception its request raised."""
    accepted, failed, lock = [], [], threading.Lock()

    def run(n):
        for _ in range(n):
            try:
                status, cid = instance.pay(amount=round(1 + len(accepted) % 97 * 0.37, 2))
            except (OSError, http.client.HTTPException) as error:
                status = type(error).__name__
            with lock:
                if type(status) is int and 200 <= status < 300:
                    accepted.append(cid)
                else:
                    failed.append(status)
    shares = [count // threads + (i < count % threads) for i in range(threads)]
    workers = [threading.Thread(target=run, args=(share,)) for share in shares]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return accepted, failed


def pay_many(instance, count, threads=8):
    """POST `count` payments concurrently; return their ids. Fails unless every one got a 2xx
    (send_payments is for the callers that expect failures, and check them)."""
    accepted, failed = send_payments(instance, count, threads)
    assert not failed, f"{len(failed)} of {count} payments not accepted: {failed[:10]}"
    return accepted
