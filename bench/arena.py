#!/usr/bin/env python3
"""The native stack: what docker-compose.yml runs, without docker.

`python -m bench.arena` (`make run`) starts

- two payment processor emulators (bench/processor.py) on 127.0.0.1:8001
  (default, fee 0.05) and :8002 (fallback, fee 0.15), admin token from
  PROCESSOR_TOKEN (default 123), unless DEFAULT_PROCESSOR_URL /
  FALLBACK_PROCESSOR_URL are set;
- two rinha.py instances, api1 and api2, listening on unix sockets in the run
  directory (default ./run/), with the environment docker-compose.yml gives
  them (tuning knobs are read from the compose file; the environment of the
  launcher overrides them);
- the load balancer (LB=haproxy, the default, or LB=nginx) on 127.0.0.1:LB_PORT
  (default 9999), reading the top-level haproxy.cfg / nginx.conf unchanged.

When running as root on cgroup v1, the load balancer and both instances (not
the emulators) run in a cgroup limited like the contest: 1.5 CPU, 350 MB.
Every child's output is printed prefixed with its name; a line containing
`arena ready` tells that everything answers. Ctrl-C or SIGTERM stops
everything: the instances first (SIGTERM, then wait), then the rest. An
instance (or anything else) that dies on its own is restarted.

Importable: see class Arena.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import errno
import fcntl
import http.client
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from bench.common import (INSTANCES, LB_SERVICE, PROCESSOR, REPO, RINHA, children_map, free_port,  # noqa: F401
                          http_request, instance_health, proc_tree_stats, read_text, tcp_open, which)

COMPOSE_FILE = REPO / "docker-compose.yml"

# What the compose file describes and the arena mirrors (checked by
# bench/test_deploy.py against docker-compose.yml), with LB_SERVICE and INSTANCES.
LB_CONFIGS = {"haproxy": "haproxy.cfg", "nginx": "nginx.conf"}
# Environment the load balancer configs read.
LB_ENV_KEYS = ("LB_HOST", "LB_PORT", "SOCKET_DIR")
# Environment keys the arena computes for each instance (addresses and paths);
# any other key of the compose file's api environment is a tuning knob that
# the arena passes on unchanged.
INSTANCE_ADDRESS_KEYS = (
    "LISTEN",
    "INSTANCE_ID",
    "PEERS",
    "JOURNAL_PATH",
    "DEFAULT_PROCESSOR_URL",
    "FALLBACK_PROCESSOR_URL",
)
# Passed to the instances when set in the launcher's environment only.
PASS_THROUGH_KEYS = ("PURGE_TOKEN",)

# Contest limits (CONTRACT.md section 4) for LB + instances together.
CPU_LIMIT = 1.5
MEMORY_LIMIT = 350 * 1024 * 1024
CFS_PERIOD_US = 100_000

DEFAULT_FEE = "0.05"
FALLBACK_FEE = "0.15"

_PR_SET_PDEATHSIG = 1
_NAME_WIDTH = len("processor-fallback")


class ArenaError(RuntimeError):
    pass


# --------------------------------------------------------------------------
# The compose file, read with PyYAML (a dev dependency, requirements-dev.txt).


def parse_compose(text: str):
    """A compose file's text as Python data (yaml.safe_load)."""
    return yaml.safe_load(text)


def load_compose(path=COMPOSE_FILE):
    return parse_compose(Path(path).read_text())


def service_env(service: dict) -> dict:
    """A compose service's environment as a dict (mapping or KEY=VALUE list form)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        out = {}
        for item in env:
            key, _, value = str(item).partition("=")
            out[key] = value
        return out
    return {str(k): ("" if v is None else str(v)) for k, v in env.items()}


def parse_memory(value) -> int:
    """Docker's memory notation ('160MB', '1g', 1048576) -> bytes (binary units)."""
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)i?b?\s*", str(value), re.I)
    if not m:
        raise ValueError(f"bad memory value {value!r}")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def compose_knobs() -> dict:
    """Tuning knobs the compose file gives the instances (non-address env keys)."""
    try:
        compose = load_compose()
        env = service_env(compose["services"][INSTANCES[0]])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as exc:
        print(f"arena: warning: cannot read instance settings from {COMPOSE_FILE.name}: {exc}", flush=True)
        return {}
    return {k: v for k, v in env.items() if k not in INSTANCE_ADDRESS_KEYS and k not in PASS_THROUGH_KEYS}


def compose_limits() -> dict:
    """{service: (cpus, memory_bytes)} from the compose file."""
    compose = load_compose()
    out = {}
    for name, svc in compose["services"].items():
        lim = svc["deploy"]["resources"]["limits"]
        out[name] = (float(lim["cpus"]), parse_memory(lim["memory"]))
    return out


def render_template(text: str, env: dict) -> str:
    """envsubst as the official nginx image runs it: ${NAME} for names that are set."""
    return re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), m.group(0)), text)


# --------------------------------------------------------------------------
# Small helpers


def ensure_lb_binary(lb: str, log=print) -> str:
    """The haproxy/nginx executable; installed with apt-get when missing and root."""
    exe = which(lb)
    if exe:
        return exe
    if os.geteuid() != 0:
        raise ArenaError(f"{lb} is not installed and this is not root: install it (apt-get install -y {lb})")
    packages = {"haproxy": [["haproxy"]], "nginx": [["nginx-light"], ["nginx"]]}[lb]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300"]
    with open("/tmp/rinha-arena-apt.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent arenas install one at a time
        for updated in (False, True):
            exe = which(lb)
            if exe:
                return exe
            if updated:
                log("arena: apt-get update")
                subprocess.run(apt + ["update", "-q"], env=env, check=False)
            for pkgs in packages:
                log(f"arena: {lb} is missing; apt-get install -y {' '.join(pkgs)}")
                r = subprocess.run(apt + ["install", "-y", "-q"] + pkgs, env=env, check=False)
                exe = which(lb)
                if r.returncode == 0 and exe:
                    return exe
    raise ArenaError(f"could not install {lb} with apt-get")


# --------------------------------------------------------------------------
# cgroup v1


def _write(path, value):
    with open(path, "w") as f:
        f.write(str(value))


class Cgroups:
    """One cgroup (per controller cpu, cpuacct, memory) created as a child of the
    launcher's own cgroup, optionally with per-service sub-cgroups."""

    CONTROLLERS = ("cpu", "cpuacct", "memory")

    def __init__(self, name: str):
        self.name = name
        self.dirs: dict[str, Path] = {}  # controller -> arena cgroup dir
        self.services: dict[str, dict[str, Path]] = {}  # service -> controller -> dir
        self._created: list[Path] = []

    @classmethod
    def probe(cls):
        """(controller -> parent dir, None) or (None, reason the limits cannot be applied)."""
        if os.geteuid() != 0:
            return None, "not running as root"
        mounts = {}
        try:
            for line in Path("/proc/mounts").read_text().splitlines():
                parts = line.split()
                if len(parts) >= 4 and parts[2] == "cgroup":
                    for opt in parts[3].split(","):
                        if opt in cls.CONTROLLERS:
                            mounts[opt] = parts[1]
            own = {}
            for line in Path("/proc/self/cgroup").read_text().splitlines():
                _, controllers, path = line.split(":", 2)
                for c in controllers.split(","):
                    own[c] = path
        except OSError as exc:
            return None, f"cannot read cgroup information: {exc}"
        missing = [c for c in cls.CONTROLLERS if c not in mounts or c not in own]
        if missing:
            return None, f"no cgroup v1 hierarchy for {', '.join(missing)} (cgroup v2 is not supported)"
        parents = {}
        for c in cls.CONTROLLERS:
            parent = Path(mounts[c] + own[c])
            if not parent.is_dir() or not os.access(parent, os.W_OK):
                return None, f"cgroup {parent} is not writable"
            parents[c] = parent
        return parents, None

    @staticmethod
    def remove_stale(parents: dict):
        """rmdir empty cgroups left by arenas that were killed (their pid is in the name)."""
        for parent in parents.values():
            try:
                entries = list(parent.iterdir())
            except OSError:
                continue
            for d in entries:
                m = re.fullmatch(r"rinha-arena-\d+-(\d+)-[0-9a-f]+", d.name)
                if not m or not d.is_dir() or Path(f"/proc/{m.group(1)}").exists():
                    continue
                for sub in [x for x in d.iterdir() if x.is_dir()] + [d]:
                    try:
                        sub.rmdir()
                    except OSError:
                        pass

    def create(self, parents: dict, cpus: float, memory: int, services: dict | None = None):
        try:
            for c, parent in parents.items():
                d = parent / self.name
                if d not in self._created:
                    d.mkdir()
                    self._created.append(d)
                self.dirs[c] = d
            self._limit(self.dirs, cpus, memory)
            for svc, (scpus, smem) in (services or {}).items():
                sub = {}
                for c, d in self.dirs.items():
                    s = d / svc
                    if s not in self._created:
                        s.mkdir()
                        self._created.append(s)
                    sub[c] = s
                self._limit(sub, scpus, smem)
                self.services[svc] = sub
        except OSError:
            self.remove()
            raise

    @staticmethod
    def _limit(dirs, cpus, memory):
        _write(dirs["cpu"] / "cpu.cfs_period_us", CFS_PERIOD_US)
        _write(dirs["cpu"] / "cpu.cfs_quota_us", int(round(cpus * CFS_PERIOD_US)))
        _write(dirs["memory"] / "memory.limit_in_bytes", memory)

    def procs_files(self, service: str | None = None) -> list[str]:
        dirs = self.services.get(service) or self.dirs
        return sorted({str(d / "cgroup.procs") for d in dirs.values()})

    @staticmethod
    def read_stats(dirs) -> dict:
        cpu_stat = {}
        for line in (read_text(dirs["cpu"] / "cpu.stat", "") or "").splitlines():
            k, _, v = line.partition(" ")
            if v.strip().isdigit():
                cpu_stat[k] = int(v)
        usage = read_text(dirs["cpuacct"] / "cpuacct.usage")
        quota = read_text(dirs["cpu"] / "cpu.cfs_quota_us")
        limit = read_text(dirs["memory"] / "memory.limit_in_bytes")
        return {
            "cpu_usage_s": int(usage) / 1e9 if usage and usage.isdigit() else None,
            "nr_periods": cpu_stat.get("nr_periods"),
            "nr_throttled": cpu_stat.get("nr_throttled"),
            "throttled_time_s": cpu_stat["throttled_time"] / 1e9 if "throttled_time" in cpu_stat else None,
            "memory_usage_bytes": int(read_text(dirs["memory"] / "memory.usage_in_bytes", "0")),
            "memory_max_usage_bytes": int(read_text(dirs["memory"] / "memory.max_usage_in_bytes", "0")),
            "memory_failcnt": int(read_text(dirs["memory"] / "memory.failcnt", "0")),
            "cpu_limit": int(quota) / CFS_PERIOD_US if quota and quota.lstrip("-").isdigit() and int(quota) > 0 else None,
            "memory_limit_bytes": int(limit) if limit and limit.isdigit() else None,
        }

    def pids(self) -> set[int]:
        out = set()
        for d in self._created:
            for line in (read_text(d / "cgroup.procs", "") or "").split():
                if line.isdigit():
                    out.add(int(line))
        return out

    def remove(self):
        """rmdir every cgroup created (deepest first); processes left inside are ours: killed."""
        for _ in range(50):
            left = self.pids()
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            remaining = []
            for d in reversed(self._created):
                try:
                    d.rmdir()
                except FileNotFoundError:
                    pass
                except OSError:
                    remaining.append(d)
            self._created = list(reversed(remaining))
            if not self._created:
                return True
            time.sleep(0.1)
        return False


def _preexec(procs_files):
    libc = None
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        pass

    def run():
        # Die with the arena even if it is killed without a chance to stop us.
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        for path in procs_files:
            with open(path, "w") as f:
                f.write(str(os.getpid()))

    return run


# --------------------------------------------------------------------------
# Children


class Child:
    def __init__(self, arena, name, argv, env, cwd, kind, procs_files=(), before_start=None):
        self.arena = arena
        self.name = name
        self.argv = [str(a) for a in argv]
        self.env = env
        self.cwd = str(cwd)
        self.kind = kind  # "instance", "lb" or "processor"
        self.procs_files = list(procs_files)
        self.before_start = before_start
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.started_at = 0.0
        self.next_restart = None
        self.tail = collections.deque(maxlen=60)
        self._pump_thread = None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill_leftovers(self):
        """SIGKILL what is left of a previous run's process group (e.g. the workers
        of an nginx master that was killed): the group is the one started here."""
        if self.proc is not None and self.proc.poll() is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def start(self):
        self.kill_leftovers()
        if self.before_start:
            self.before_start()
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the arena only; it stops us in order
            preexec_fn=_preexec(self.procs_files),
        )
        self.started_at = time.monotonic()
        self._pump_thread = threading.Thread(target=self._pump, args=(self.proc,), daemon=True, name=f"pump-{self.name}")
        self._pump_thread.start()

    def _pump(self, proc):
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.tail.append(line)
            self.arena._emit(self.name, line)
        proc.stdout.close()

    def signal(self, sig):
        if self.alive():
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout):
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def join_output(self, timeout=2.0):
        if self._pump_thread:
            self._pump_thread.join(timeout)


# --------------------------------------------------------------------------
# The arena


class Arena:
    """The native stack on configurable ports.

    Arena(lb_port=9999, default_port=8001, fallback_port=8002, run_dir=None,
          lb=None, limits=True, env=None, start_timeout=60.0, output=None,
          processor_args=(), instance_command=(RINHA,))

    Arena.on_free_ports(log_path, ...) is the same on free ports in a temporary run
    directory, its output written to log_path; stop() removes both.

    - a port of 0 picks a free one (read it back from .lb_port etc.);
    - run_dir: sockets, journals, rendered configs (default <repo>/run);
    - lb: "haproxy" or "nginx" (default: $LB, else haproxy);
    - limits: True = one cgroup with 1.5 CPU / 350 MB for LB + instances,
      "per-service" = the same plus a sub-cgroup per service limited as in
      docker-compose.yml, False = none;
    - env: overrides of the launcher's environment (processor URLs, PURGE_TOKEN,
      PROCESSOR_TOKEN, tuning knobs for the instances);
    - output: callable(str) for the prefixed log lines (default: stdout), or
      False to keep them only in memory (.tail(name)).
    - instance_command: the interpreter's arguments for api1 and api2, run from the
      repository's root (bench/floor.py puts bench/floors.py's NULL_INSTANCE there to
      measure the stack with instances that do nothing).
    """

    def __init__(
        self,
        lb_port=9999,
        default_port=8001,
        fallback_port=8002,
        run_dir=None,
        lb=None,
        limits=True,
        env=None,
        start_timeout=60.0,
        output=None,
        processor_args=(),
        instance_command=(RINHA,),
    ):
        self.base_env = dict(os.environ)
        self.base_env.update({k: str(v) for k, v in (env or {}).items()})
        self.lb = lb or self.base_env.get("LB") or "haproxy"
        if self.lb not in LB_CONFIGS:
            raise ArenaError(f"unknown load balancer {self.lb!r} (haproxy or nginx)")
        taken = {int(p) for p in (lb_port, default_port, fallback_port) if p}

        def pick(port):  # 0 = a free port, distinct from the others
            port = int(port)
            while not port:
                port = free_port()
                port = 0 if port in taken else port
            taken.add(port)
            return port

        self.lb_port = pick(lb_port)
        self.run_dir = Path(run_dir or REPO / "run").resolve()
        self.limits = limits
        self.start_timeout = float(start_timeout)
        self.processor_args = [str(a) for a in processor_args]
        self.instance_command = [str(a) for a in instance_command]
        self._output = output
        self._out_lock = threading.RLock()  # re-entered by a signal handler that logs (main())
        self.token = self.base_env.get("PROCESSOR_TOKEN") or "123"

        self.default_port = self.fallback_port = None
        self.default_url = self.base_env.get("DEFAULT_PROCESSOR_URL") or ""
        self.fallback_url = self.base_env.get("FALLBACK_PROCESSOR_URL") or ""
        if not self.default_url:
            self.default_port = pick(default_port)
            self.default_url = f"http://127.0.0.1:{self.default_port}"
        if not self.fallback_url:
            self.fallback_port = pick(fallback_port)
            self.fallback_url = f"http://127.0.0.1:{self.fallback_port}"

        self.cgroup_name = f"rinha-arena-{self.lb_port}-{os.getpid()}-{secrets.token_hex(3)}"
        self.cgroups: Cgroups | None = None
        self.limits_applied = False
        self.limits_reason = "limits not requested"
        self.children: dict[str, Child] = {}
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._abort = threading.Event()
        self._finished = threading.Event()
        self._supervisor = None
        self._started = False
        self._knobs = compose_knobs()
        self._warned_mode = set()
        self._cleanup = []  # run at the end of stop(): see on_free_ports

    @classmethod
    def on_free_ports(cls, log_path, run_prefix="rinha-arena-", **kw):
        """An Arena on free ports in a new temporary run directory (short: unix socket paths),
        its output written to log_path; stop() closes the log and removes the directory."""
        run_dir = Path(tempfile.mkdtemp(prefix=run_prefix))
        log = open(log_path, "w")

        def output(line):
            log.write(line + "\n")
            log.flush()

        arena = cls(lb_port=0, default_port=0, fallback_port=0, run_dir=run_dir, output=output, **kw)
        arena.log_path = Path(log_path)
        arena._cleanup += [log.close, lambda: shutil.rmtree(run_dir, ignore_errors=True)]
        return arena

    # -- addresses and environments (also used by bench/test_deploy.py)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.lb_port}"

    def socket_path(self, name) -> Path:
        return self.run_dir / f"{name}.sock"

    def journal_path(self, name) -> Path:
        return self.run_dir / f"{name}.journal"

    def lb_config_path(self) -> Path:
        return REPO / LB_CONFIGS[self.lb]

    def lb_env(self) -> dict:
        return {"LB_HOST": "127.0.0.1", "LB_PORT": str(self.lb_port), "SOCKET_DIR": str(self.run_dir)}

    def instance_env(self, name) -> dict:
        """The variables the arena sets for an instance (on top of the launcher's environment)."""
        peers = [n for n in INSTANCES if n != name]
        env = {}
        for key, value in self._knobs.items():
            env[key] = self.base_env.get(key, value)
        env.update(
            {
                "LISTEN": f"unix:{self.socket_path(name)}",
                "INSTANCE_ID": name,
                "PEERS": ",".join(f"unix:{self.socket_path(p)}" for p in peers),
                "JOURNAL_PATH": str(self.journal_path(name)),
                "DEFAULT_PROCESSOR_URL": self.default_url,
                "FALLBACK_PROCESSOR_URL": self.fallback_url,
            }
        )
        for key in PASS_THROUGH_KEYS:
            if self.base_env.get(key):
                env[key] = self.base_env[key]
        return env

    # -- output

    def _emit(self, name, line):
        if self._output is False:
            return
        text = f"{name:<{_NAME_WIDTH}} | {line}"
        if callable(self._output):
            self._output(text)
            return
        with self._out_lock:
            try:
                sys.stdout.write(text + "\n")
                sys.stdout.flush()
            except (OSError, ValueError):
                pass

    def log(self, msg):
        self._emit("arena", msg)

    def tail(self, name) -> list[str]:
        """The last lines a child printed."""
        return list(self.children[name].tail)

    # -- lifecycle

    def request_stop(self):
        """Abort a start() in progress (signal handlers call this)."""
        self._abort.set()

    def start(self):
        if self._started:
            raise ArenaError("arena already started")
        self._started = True
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _start(self):
        script = Path(self.instance_command[0])
        if not self.instance_command[0].startswith("-") and not script.exists():
            raise ArenaError(f"{script} does not exist")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        longest = max(len(str(self.socket_path(n))) for n in INSTANCES)
        if longest > 100:
            raise ArenaError(f"run dir {self.run_dir} is too long for unix socket paths")
        lb_exe = ensure_lb_binary(self.lb, self.log)
        for what, port in (("load balancer", self.lb_port), ("processor-default", self.default_port),
                           ("processor-fallback", self.fallback_port)):
            if port is not None and tcp_open("127.0.0.1", port, 0.2):
                raise ArenaError(f"port {port} for the {what} is already in use (another arena running?)")
        self._setup_limits()
        py = sys.executable

        # Processor emulators (outside the limits: they stand for the contest's processors).
        emulators = []
        for name, port, fee in (
            ("processor-default", self.default_port, DEFAULT_FEE),
            ("processor-fallback", self.fallback_port, FALLBACK_FEE),
        ):
            if port is None:
                continue
            if not PROCESSOR.exists():
                raise ArenaError(f"{PROCESSOR} does not exist (or set DEFAULT/FALLBACK_PROCESSOR_URL)")
            argv = [py, PROCESSOR, "--host", "127.0.0.1", "--port", port, "--fee", fee, "--token", self.token]
            argv += self.processor_args
            self._add(name, argv, dict(self.base_env), "processor").start()
            emulators.append((name, port))
        for name, port in emulators:
            child = self.children[name]
            self._wait(name, lambda c=child: any("listening" in ln for ln in c.tail), f"{name} listening on 127.0.0.1:{port}")

        # The instances.
        for name in INSTANCES:
            env = dict(self.base_env)
            env.update(self.instance_env(name))
            sock = self.socket_path(name)
            child = self._add(name, [py, *self.instance_command], env, "instance", service=name, before_start=lambda s=sock: _unlink(s))
            child.start()
        for name in INSTANCES:
            self._wait_instance(name)

        # The load balancer.
        env = dict(self.base_env)
        env.update(self.lb_env())
        if self.lb == "haproxy":
            argv = [lb_exe, "-db", "-f", self.lb_config_path()]
        else:
            conf = self.run_dir / "nginx.conf"
            conf.write_text(render_template(self.lb_config_path().read_text(), self.lb_env()))
            glob = f"daemon off; pid {self.run_dir / 'nginx.pid'};"
            if os.geteuid() == 0:
                glob += " user root;"  # workers must reach sockets in private dirs (tests' tmp dirs)
            argv = [lb_exe, "-c", conf, "-p", f"{self.run_dir}/", "-e", "stderr", "-g", glob]
        self._add(LB_SERVICE, argv, env, "lb", service=LB_SERVICE).start()
        self._wait(LB_SERVICE, self._lb_ready, f"GET {self.url}/payments-summary -> 200")

        self._supervisor = threading.Thread(target=self._supervise, daemon=True, name="arena-supervisor")
        self._supervisor.start()
        procs = ", ".join(f"{n} pid {c.pid}" for n, c in self.children.items())
        self.log(
            f"arena ready: {self.url} (lb={self.lb}, default={self.default_url}, "
            f"fallback={self.fallback_url}, run_dir={self.run_dir}; {procs})"
        )

    def _setup_limits(self):
        if not self.limits:
            self.log("resource limits not applied: disabled")
            self.limits_reason = "disabled"
            return
        parents, reason = Cgroups.probe()
        services = None
        if parents and self.limits == "per-service":
            try:
                services = {s: v for s, v in compose_limits().items() if s in (LB_SERVICE,) + INSTANCES}
            except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as exc:
                reason = f"cannot read per-service limits from {COMPOSE_FILE.name}: {exc}"
                parents = None
        if parents:
            Cgroups.remove_stale(parents)
            cg = Cgroups(self.cgroup_name)
            try:
                cg.create(parents, CPU_LIMIT, MEMORY_LIMIT, services)
            except OSError as exc:
                reason = f"cannot create cgroup: {exc}"
            else:
                self.cgroups = cg
                self.limits_applied = True
                self.limits_reason = "applied"
                where = ", ".join(f"{c}={d}" for c, d in cg.dirs.items())
                extra = ""
                if services:
                    extra = "; per service: " + ", ".join(
                        f"{s} {c:g} CPU/{m // (1 << 20)} MB" for s, (c, m) in services.items()
                    )
                self.log(
                    f"resource limits applied: {LB_SERVICE} + {' + '.join(INSTANCES)} in cgroup "
                    f"{self.cgroup_name}: {CPU_LIMIT:g} CPU, {MEMORY_LIMIT // (1 << 20)} MB{extra} ({where})"
                )
                return
        self.limits_reason = reason
        self.log(f"resource limits NOT applied: {reason}")

    def _add(self, name, argv, env, kind, service=None, before_start=None):
        procs = self.cgroups.procs_files(service) if (self.cgroups and service) else ()
        child = Child(self, name, argv, env, REPO, kind, procs, before_start)
        with self._lock:
            self.children[name] = child
        return child

    def _wait(self, name, check, what, timeout=None):
        deadline = time.monotonic() + (timeout or self.start_timeout)
        child = self.children[name]
        while True:
            if self._abort.is_set():
                raise ArenaError("interrupted")
            if not child.alive():
                child.join_output(1.0)
                rc = child.proc.returncode if child.proc else None
                raise ArenaError(f"{name} exited with code {rc} before {what}; last output:\n" + "\n".join(child.tail))
            try:
                if check():
                    return
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                raise ArenaError(f"timed out waiting for {what}; last output of {name}:\n" + "\n".join(child.tail))
            time.sleep(0.05)

    def _instance_answers(self, name) -> bool:
        status, _ = http_request(f"unix:{self.socket_path(name)}", "GET", "/health", timeout=2.0)
        return 100 <= status < 600

    def health(self, name, timeout=2.0):
        """An instance's GET /health as a dict; None when it does not answer 200."""
        return instance_health(self.socket_path(name), timeout)

    def wait_drained(self, timeout_s, fields=("queue", "in_flight"), poll_s=0.05):
        """Until every instance's /health reports 0 for each of `fields` (what it accepted is
        settled). -> (seconds waited, or None when timeout_s passed first; {instance: last
        health, or None when it did not answer})."""
        started = time.monotonic()
        while True:
            healths = {name: self.health(name) for name in INSTANCES}
            if all(h and all(h[f] == 0 for f in fields) for h in healths.values()):
                return time.monotonic() - started, healths
            if time.monotonic() - started > timeout_s:
                return None, healths
            time.sleep(poll_s)

    def _wait_instance(self, name, timeout=None):
        self._wait(name, lambda: self._instance_answers(name), f"{name} answering on {self.socket_path(name)}", timeout)
        self._check_socket_mode(name)

    def _check_socket_mode(self, name):
        try:
            mode = os.stat(self.socket_path(name)).st_mode & 0o777
        except OSError:
            return
        if mode & 0o006 != 0o006 and name not in self._warned_mode:
            self._warned_mode.add(name)
            self.log(
                f"warning: {self.socket_path(name).name} has mode {mode:o}: in docker compose the load "
                "balancer runs as another user and needs it world-writable (rinha.py should chmod it 0666)"
            )

    def _lb_ready(self) -> bool:
        status, _ = http_request(self.url, "GET", "/payments-summary", timeout=2.0)
        return status == 200

    def _supervise(self):
        # Children restarted here get PR_SET_PDEATHSIG tied to this thread: it
        # lives until stop() has stopped them all.
        try:
            self._supervise_loop()
        finally:
            self._finished.wait()

    def _supervise_loop(self):
        while not self._stopping.wait(0.1):
            with self._lock:
                for child in list(self.children.values()):
                    if self._stopping.is_set() or child.proc is None or child.alive():
                        continue
                    now = time.monotonic()
                    if child.next_restart is None:
                        rc = child.proc.returncode
                        quick = now - child.started_at < 2.0
                        delay = min(5.0, 0.25 * 2 ** min(child.restarts, 5)) if quick else 0.0
                        child.next_restart = now + delay
                        self.log(
                            f"{child.name} (pid {child.pid}) exited unexpectedly with code {rc}; "
                            f"restarting{f' in {delay:.2f}s' if delay else ''}"
                        )
                    if now >= child.next_restart:
                        child.join_output(0.5)
                        child.next_restart = None
                        child.restarts += 1
                        try:
                            child.start()
                            self.log(f"{child.name} restarted (pid {child.pid}, restart #{child.restarts})")
                        except OSError as exc:
                            self.log(f"{child.name} could not be restarted: {exc}")
                            child.started_at = now

    def _answers(self, child) -> bool:
        if child.kind == "instance":
            return self._instance_answers(child.name)
        if child.kind == "lb":
            return self._lb_ready()
        port = self.default_port if child.name == "processor-default" else self.fallback_port
        return tcp_open("127.0.0.1", port)

    def kill_instance(self, name, wait=True, timeout=30.0):
        """SIGKILL a child (an instance, or also "load-balancer", "processor-default",
        "processor-fallback"); the supervisor restarts it. With wait, return once the
        new process answers. Returns the new pid (or None without wait)."""
        child = self.children[name]
        old_pid = child.pid
        before = child.restarts
        child.signal(signal.SIGKILL)
        if not wait:
            return None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if child.restarts > before and child.alive() and child.pid != old_pid:
                try:
                    if self._answers(child):
                        return child.pid
                except (OSError, http.client.HTTPException):
                    pass
            time.sleep(0.05)
        raise ArenaError(f"{name} did not come back within {timeout}s")

    def stop(self):
        """Stop everything started: instances first (SIGTERM, wait), then LB and emulators."""
        if self._stopping.is_set():
            return
        t0 = time.monotonic()
        self._stopping.set()
        self._abort.set()
        with self._lock:  # waits for a restart in progress
            children = dict(self.children)
        grace = float(self.base_env.get("SHUTDOWN_GRACE_S") or 5.0) + 5.0
        instances = [c for c in children.values() if c.kind == "instance"]
        others = [c for c in children.values() if c.kind != "instance"]
        for group, wait in ((instances, grace), (others, 5.0)):
            for c in group:
                c.signal(signal.SIGTERM)
            deadline = time.monotonic() + wait
            for c in group:
                if not c.wait(max(0.0, deadline - time.monotonic())):
                    self.log(f"{c.name} (pid {c.pid}) did not stop within {wait:.0f}s; SIGKILL")
                    c.signal(signal.SIGKILL)
                    c.wait(5.0)
        for c in children.values():
            c.kill_leftovers()
            c.join_output(2.0)
            if c.proc and c.proc.returncode not in (0, None, -signal.SIGTERM):
                self.log(f"{c.name} exited with code {c.proc.returncode}")
        self._finished.set()
        if self._supervisor:
            self._supervisor.join(2.0)
        if self.cgroups:
            if not self.cgroups.remove():
                self.log(f"warning: could not remove cgroup {self.cgroup_name}")
        for name in INSTANCES:
            _unlink(self.socket_path(name))
        if self._started:
            self.log(f"arena stopped ({time.monotonic() - t0:.1f}s)")
        for cleanup in self._cleanup:
            cleanup()

    # -- measurements

    def stats(self) -> dict:
        """Counters for bench.py. Cgroup figures are None when limits are not applied.

        Keys: limits_applied, limits_reason, cgroup_name, cgroup (controller ->
        path), cpu_usage_s (cpuacct.usage), nr_periods, nr_throttled,
        throttled_time_s (cpu.stat), memory_usage_bytes,
        memory_max_usage_bytes, memory_failcnt, cpu_limit, memory_limit_bytes,
        services ({service: same cgroup keys} with per-service limits),
        processes ({name: {pid, alive, restarts, cpu_s, rss_bytes, peak_rss_bytes}},
        from /proc, the process and its descendants, for every child).
        """
        out = {
            "limits_applied": self.limits_applied,
            "limits_reason": self.limits_reason,
            "cgroup_name": self.cgroup_name if self.cgroups else None,
            "cgroup": {c: str(d) for c, d in self.cgroups.dirs.items()} if self.cgroups else None,
        }
        keys = (
            "cpu_usage_s nr_periods nr_throttled throttled_time_s memory_usage_bytes "
            "memory_max_usage_bytes memory_failcnt cpu_limit memory_limit_bytes"
        ).split()
        if self.cgroups:
            out.update(Cgroups.read_stats(self.cgroups.dirs))
            out["services"] = {s: Cgroups.read_stats(d) for s, d in self.cgroups.services.items()}
        else:
            out.update({k: None for k in keys})
            out["services"] = {}
        ppids = children_map()
        procs = {}
        with self._lock:
            children = dict(self.children)
        for name, c in children.items():
            info = {"pid": c.pid, "alive": c.alive(), "restarts": c.restarts, "cpu_s": None, "rss_bytes": None, "peak_rss_bytes": None}
            if c.alive():
                info["cpu_s"], info["rss_bytes"], info["peak_rss_bytes"] = proc_tree_stats(c.pid, ppids)
            procs[name] = info
        out["processes"] = procs
        return out

    def reset_peak_memory(self):
        """Reset memory.max_usage_in_bytes (of the arena cgroup and its sub-cgroups)."""
        if not self.cgroups:
            return
        for dirs in [self.cgroups.dirs] + list(self.cgroups.services.values()):
            try:
                _write(dirs["memory"] / "memory.max_usage_in_bytes", 0)
            except OSError:
                pass


def start_measured(arena, log, error=RuntimeError, unlimited="", announce=True):
    """Start an arena made by Arena.on_free_ports for a measurement, telling log(...) so (with
    announce) and when its limits were asked for but could not be applied (adding what that
    leaves out: `unlimited`). Returns it; raises error("the stack did not start: ...") when it
    does not start."""
    if announce:
        log(f"starting the stack (lb={arena.lb}, limits 1.5 CPU / 350 MB; log {arena.log_path})")
    try:
        arena.start()
    except ArenaError as exc:
        raise error(f"the stack did not start: {exc}") from None
    if arena.limits and not arena.limits_applied:
        log(f"WARNING: resource limits not applied ({arena.limits_reason}){unlimited}")
    return arena


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lb", default=os.environ.get("LB", "haproxy"), choices=sorted(LB_CONFIGS), help="load balancer ($LB)")
    p.add_argument("--port", type=int, default=int(os.environ.get("LB_PORT") or 9999), help="load balancer port ($LB_PORT)")
    p.add_argument("--run-dir", default=os.environ.get("ARENA_RUN_DIR") or str(REPO / "run"), help="($ARENA_RUN_DIR)")
    lim = os.environ.get("ARENA_LIMITS", "1").lower()
    p.add_argument(
        "--limits",
        default={"0": "off", "no": "off", "off": "off", "false": "off", "per-service": "per-service"}.get(lim, "on"),
        choices=["on", "off", "per-service"],
        help="cgroup limits: on = 1.5 CPU/350 MB in total, per-service = also per compose service ($ARENA_LIMITS)",
    )
    p.add_argument("--default-port", type=int, default=8001, help="default processor emulator port")
    p.add_argument("--fallback-port", type=int, default=8002, help="fallback processor emulator port")
    args = p.parse_args(argv)
    limits = {"on": True, "off": False, "per-service": "per-service"}[args.limits]
    arena = Arena(lb_port=args.port, default_port=args.default_port, fallback_port=args.fallback_port,
                  run_dir=args.run_dir, lb=args.lb, limits=limits)
    stop = threading.Event()

    def on_signal(signum, frame):
        if not stop.is_set():
            arena.log(f"received {signal.Signals(signum).name}: stopping")
        stop.set()
        arena.request_stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    rc = 0
    try:
        arena.start()
        while not stop.wait(0.5):
            pass
    except ArenaError as exc:
        if not stop.is_set():
            arena.log(f"error: {exc}")
            rc = 1
    finally:
        arena.stop()
    return rc


if __name__ == "__main__":
    sys.exit(main())
