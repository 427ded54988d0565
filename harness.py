"""The test harness shared by test_rinha.py and conftest.py: rinha.py instances (in-process, on
their own event loop in a thread of the test process, or as child processes), the processor
emulator bench/processor.py, all on free ports; plain HTTP and raw-socket clients, waiting on
a condition, and the checks most tests end with. The fixtures that start and stop these are in
conftest.py."""
import asyncio
import contextlib
import gc
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from decimal import Decimal
from pathlib import Path

import uvloop

import rinha

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


def instance_env(tmp, name, default, fallback, port, env):
    """The settings every test instance starts with (as environment variables), then `env`."""
    return {"LISTEN": f"127.0.0.1:{port}", "INSTANCE_ID": name, "JOURNAL_PATH": str(tmp / f"{name}.journal"),
            "DEFAULT_PROCESSOR_URL": default.url if default else "http://127.0.0.1:9",
            "FALLBACK_PROCESSOR_URL": fallback.url if fallback else "http://127.0.0.1:9",
            "HEALTH_INTERVAL_S": "0", "SHUTDOWN_GRACE_S": "3", "PURGE_TOKEN": "",
            **{key: str(value) for key, value in env.items()}}


class Client:
    """What Instance and InProcessInstance share: the HTTP calls the tests make to an instance
    on its port, and holding it still (pause() and resume(), each class its own way)."""

    def health(self):
        return json.loads(call(self.port, "GET", "/health")[2])

    def summary(self, query=""):
        status, _, body = call(self.port, "GET", "/payments-summary" + query)
        assert status == 200, body
        return json.loads(body)

    def pay(self, cid=None, amount=19.90):
        cid = cid or str(uuid.uuid4())
        return call(self.port, "POST", "/payments", {"correlationId": cid, "amount": amount})[0], cid

    @contextlib.contextmanager
    def paused(self):
        self.pause()
        try:
            yield
        finally:
            self.resume()


class Instance(Client):
    """rinha.py as a child process on a free port (and optionally a unix socket), journal in a
    temp dir; `code`, if given, is run instead (it imports rinha, patches it and calls
    rinha.main()). For the tests that need a process: to kill, hang (SIGSTOP) or signal it."""

    def __init__(self, tmp, name="api1", default=None, fallback=None, port=None, code=None, **env):
        self.port = port or free_port()
        self.name = name
        self.args = [PYTHON, "-c", code] if code else [PYTHON, str(ROOT / "rinha.py")]
        self.env = instance_env(tmp, name, default, fallback, self.port, env)
        self.journal = self.env["JOURNAL_PATH"]
        self.start()

    def start(self):
        self.process = Process(self.args, "listening on", self.env)

    def stop(self, sig=signal.SIGTERM, timeout=20):
        """Signal it and wait for its exit (SIGKILL after `timeout`); its exit status."""
        return self.process.stop(sig, timeout)

    def output(self):
        return self.process.output()

    def running(self):
        return self.process.popen.poll() is None

    def pause(self):
        """SIGSTOP (once the process is stopped): it neither answers nor closes until resume()."""
        self.process.popen.send_signal(signal.SIGSTOP)
        assert wait_until(lambda: self.state() in "Tt", timeout=5), self.state()

    def resume(self):
        if self.running():
            self.process.popen.send_signal(signal.SIGCONT)

    def state(self):
        try:
            return Path(f"/proc/{self.process.popen.pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            return "X"


class LogBuffer:
    """Where an in-process instance's log lines go (rinha.LOG.stream of its thread)."""

    def __init__(self):
        self.parts = []

    def write(self, text):
        self.parts.append(text)

    def flush(self):
        pass

    def getvalue(self):
        return "".join(self.parts)


class InProcessInstance(Client):
    """rinha.serve(config, stop, started) on its own uvloop event loop in a daemon thread of
    the test process: the interface of Instance (port, name, journal, env, start, stop, output,
    running, pause/resume/paused, health, summary, pay), where a setting needs no process of its
    own. `server` is the running rinha.Server; the Config is built from the same variables
    a child process would get (rinha.Config.from_env), so `env` may be changed before start().
    Its log lines (and whatever its loop reports, as uvloop's "Fatal error on transport") go
    to a buffer of its own, output()."""

    STOP_TIMEOUT_S = 20
    lock, serving = threading.Lock(), 0  # how many serve() run in this process (see run())

    def __init__(self, tmp, name="api1", default=None, fallback=None, port=None, **env):
        self.port = port or free_port()
        self.name = name
        self.env = instance_env(tmp, name, default, fallback, self.port, env)
        self.journal = self.env["JOURNAL_PATH"]
        self.thread = self.server = None
        self.start()

    def start(self):
        assert not self.running(), f"{self.name} is running"
        try:
            self.config = rinha.Config.from_env(self.env)
        except SystemExit as error:  # a malformed setting: what the process would have said
            raise RuntimeError(f"in-process {self.name} not started: {error}") from None
        self.log, self.server, self.returncode = LogBuffer(), None, None
        self.loop = uvloop.new_event_loop()
        self.loop.set_exception_handler(self.loop_error)
        self.stop_future = self.loop.create_future()
        self.ready, self.unpaused = threading.Event(), threading.Event()
        self.unpaused.set()
        self.thread = threading.Thread(target=self.run, name=f"rinha-{self.name}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.ready.wait(0.05) and self.thread.is_alive() and time.monotonic() < deadline:
            pass
        if not self.ready.is_set():
            self.thread.join(1)
            raise RuntimeError(f"in-process {self.name} not ready:\n{self.output()}")

    def run(self):
        rinha.LOG.stream = self.log
        asyncio.set_event_loop(self.loop)
        with InProcessInstance.lock:
            InProcessInstance.serving += 1
        try:
            self.loop.run_until_complete(rinha.serve(self.config, self.stop_future, self.started))
            self.returncode = 0
        except BaseException:  # as a process would, say why it ended
            self.log.write(traceback.format_exc())
            self.returncode = 1
        finally:
            try:
                self.close_loop()
            finally:
                with InProcessInstance.lock:
                    InProcessInstance.serving -= 1
                    if not InProcessInstance.serving:
                        gc.unfreeze()  # what serve() froze for its run may be collected again

    def started(self, server):
        self.server = server
        self.ready.set()

    def close_loop(self):
        """What the exit of a process would do after serve() returned: the remaining tasks
        cancelled (as uvloop.run does), client connections closed, the loop closed."""
        loop = self.loop
        try:
            if self.server is not None:
                journal = self.server.pipeline.journal
                if self.returncode != 0:  # serve() raised before it closed the journal
                    with contextlib.suppress(OSError):
                        os.close(journal.fd)
                # serve() closed the journal: its number may be another file's by now (one
                # this process opened since). A cancelled attempt that still journals must
                # fail, as it does in a process, not write into that file.
                journal.fd = -1
                for connection in list(self.server.connections):
                    if connection.transport is not None:
                        connection.transport.abort()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def loop_error(self, loop, context):
        """The loop's exception handler: what the default one would log, in this log."""
        error = context.get("exception")
        detail = "".join(traceback.format_exception(error)) if error is not None else ""
        self.log.write(f"{context.get('message', 'error in the event loop')}\n{detail}")

    def running(self):
        return self.thread is not None and self.thread.is_alive()

    def output(self):
        return self.log.getvalue()

    def stop(self):
        """Set `stop` and wait for serve() to drain and return (SHUTDOWN_GRACE_S); 0 if it
        returned, 1 if it raised (the traceback is in output())."""
        if self.running():
            self.resume()
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: it has ended
                self.loop.call_soon_threadsafe(lambda: self.stop_future.done() or self.stop_future.set_result(None))
            self.thread.join(self.STOP_TIMEOUT_S)
            if self.thread.is_alive():
                raise RuntimeError(f"in-process {self.name} did not stop within {self.STOP_TIMEOUT_S} s:\n"
                                   + self.output())
        return self.returncode

    def pause(self):
        """Hold its event loop (a callback that blocks): it neither answers nor closes, its
        timers do not run, until resume(); as SIGSTOP would hold a process."""
        assert self.unpaused.is_set(), "paused already"
        held = threading.Event()
        self.unpaused.clear()

        def hold():
            held.set()
            self.unpaused.wait()
        self.loop.call_soon_threadsafe(hold)
        assert held.wait(5), f"{self.name}'s loop did not take the pause"

    def resume(self):
        self.unpaused.set()


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
