"""Deployment checks: docker-compose.yml against CONTRACT.md section 4 and
against what bench/arena.py runs natively; the load balancer configs; the
Dockerfile; and a smoke test of the native arena.

Every compose check is also shown to fail on a deliberately broken copy of
the compose text (test_check_catches_mutation).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from bench import arena
from bench.common import tcp_open
from bench.floors import NULL_INSTANCE

ROOT = arena.REPO
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
CPU_MAX = 1.5
MEMORY_MAX = 350 * 1024 * 1024
# Where each load balancer image reads the config file.
LB_MOUNTS = {
    "haproxy": ("haproxy.cfg", "/usr/local/etc/haproxy/haproxy.cfg"),
    "nginx": ("nginx.conf", "/etc/nginx/templates/nginx.conf.template"),
}
CONTEST_PROCESSORS = {
    "DEFAULT_PROCESSOR_URL": "http://payment-processor-default:8080",
    "FALLBACK_PROCESSOR_URL": "http://payment-processor-fallback:8080",
}


# --------------------------------------------------------------------------
# helpers


def services(c):
    return c["services"]


def limits(svc):
    return ((svc.get("deploy") or {}).get("resources") or {}).get("limits") or {}


def lb_kind(svc):
    image = str(svc.get("image", ""))
    for kind in arena.LB_CONFIGS:
        if image.startswith(kind + ":") or image == kind or f"/{kind}:" in image:
            return kind
    return None


def volume_mounts(svc):
    """[(source, target, options)] of short-syntax volumes."""
    out = []
    for v in svc.get("volumes") or []:
        parts = str(v).split(":")
        out.append((parts[0], parts[1] if len(parts) > 1 else "", parts[2] if len(parts) > 2 else ""))
    return out


def is_app(svc):
    return svc.get("build") in (".", "./") or (isinstance(svc.get("build"), dict) and svc["build"].get("context") in (".", "./"))


def app_services(c):
    """Services built from the repo, and services running the image one of those builds."""
    built = {s.get("image") for s in services(c).values() if is_app(s)} - {None}
    return {n: s for n, s in services(c).items() if is_app(s) or s.get("image") in built}


def lb_backends(c):
    """Socket paths the load balancer's config sends traffic to (after substitution)."""
    lb = services(c)[arena.LB_SERVICE]
    kind = lb_kind(lb)
    text = arena.render_template((ROOT / arena.LB_CONFIGS[kind]).read_text(), arena.service_env(lb))
    if kind == "haproxy":
        return re.findall(r'^\s*server\s+\S+\s+"?unix@([^"\s]+)"?', text, re.M)
    return re.findall(r"^\s*server\s+unix:([^;\s]+)", text, re.M)


# --------------------------------------------------------------------------
# compose checks (each takes the parsed compose file; AssertionError = broken)


def check_cpu_total(c):
    total = sum(float(limits(s).get("cpus", 0)) for s in services(c).values())
    assert total <= CPU_MAX + 1e-9, f"cpus add up to {total:g} > {CPU_MAX}"


def check_memory_total(c):
    total = sum(arena.parse_memory(limits(s).get("memory", 0)) for s in services(c).values())
    assert total <= MEMORY_MAX, f"memory adds up to {total / 2**20:g} MB > 350 MB"


def check_limits_everywhere(c):
    for name, s in services(c).items():
        lim = limits(s)
        assert "cpus" in lim and float(lim["cpus"]) > 0, f"{name} has no deploy.resources.limits.cpus"
        assert "memory" in lim and arena.parse_memory(lim["memory"]) > 0, f"{name} has no deploy.resources.limits.memory"


def check_port_9999(c):
    published = []
    for name, s in services(c).items():
        for p in s.get("ports") or []:
            published.append((name, str(p)))
    lb_ports = [p for n, p in published if n == arena.LB_SERVICE]
    assert any(re.fullmatch(r"(?:[0-9.]+:)?9999:9999(?:/tcp)?", p) for p in lb_ports), f"9999 not published by the LB: {published}"
    assert all(n == arena.LB_SERVICE for n, _ in published), f"only the LB publishes ports: {published}"


def check_bridge_networks(c):
    for name, net in (c.get("networks") or {}).items():
        net = net or {}
        if net.get("external"):
            continue
        assert net.get("driver", "bridge") == "bridge", f"network {name} uses driver {net.get('driver')}"


def check_no_host_mode(c):
    for name, s in services(c).items():
        assert "network_mode" not in s, f"{name} sets network_mode {s['network_mode']}"
        assert s.get("pid") != "host" and s.get("ipc") != "host", f"{name} shares a host namespace"


def check_no_privileged(c):
    for name, s in services(c).items():
        assert not s.get("privileged"), f"{name} is privileged"
        assert not s.get("cap_add"), f"{name} adds capabilities"


def check_no_replicas(c):
    for name, s in services(c).items():
        assert "replicas" not in (s.get("deploy") or {}), f"{name} sets deploy.replicas"
        assert "scale" not in s, f"{name} sets scale"


def check_external_network(c):
    net = (c.get("networks") or {}).get("payment-processor") or {}
    assert net.get("external") is True, "network payment-processor must be declared external"
    apps = app_services(c)
    assert apps, "no service built from the Dockerfile"
    for name, s in apps.items():
        assert "payment-processor" in (s.get("networks") or []), f"{name} is not on the payment-processor network"
        env = arena.service_env(s)
        for key, url in CONTEST_PROCESSORS.items():
            assert env.get(key) == url, f"{name}: {key}={env.get(key)!r}, expected {url}"


def check_instances_behind_lb(c):
    apps = app_services(c)
    assert len(apps) >= 2, f"need at least two rinha.py instances, found {sorted(apps)}"
    listening = {}
    for name, s in apps.items():
        for addr in arena.service_env(s).get("LISTEN", "").split(","):
            if addr.startswith("unix:"):
                listening[addr[5:]] = name
    backends = lb_backends(c)
    served = {listening.get(path) for path in backends}
    assert None not in served, f"LB sends to sockets no instance listens on: {backends} vs {listening}"
    assert len(served) >= 2, f"LB reaches fewer than two instances: {served}"
    lb = services(c)[arena.LB_SERVICE]
    depends = lb.get("depends_on") or []
    assert all(n in depends for n in served), f"LB must depend on {sorted(served)}"
    # The socket directory is one volume shared by the LB and the instances.
    sock_dir = arena.service_env(lb).get("SOCKET_DIR")
    lb_vols = {t: src for src, t, _ in volume_mounts(lb)}
    assert sock_dir in lb_vols, f"LB does not mount the socket dir {sock_dir}"
    for name in served:
        vols = {t: src for src, t, _ in volume_mounts(apps[name])}
        assert vols.get(sock_dir) == lb_vols[sock_dir], f"{name} does not share the socket volume with the LB"


def check_lb_config_mounted(c):
    lb = services(c).get(arena.LB_SERVICE)
    assert lb is not None, f"no service {arena.LB_SERVICE}"
    kind = lb_kind(lb)
    assert kind, f"LB image {lb.get('image')} is neither haproxy nor nginx"
    assert re.search(r":\d[\w.-]*$", str(lb["image"])) and not str(lb["image"]).endswith(":latest"), "LB image tag not pinned"
    fname, target = LB_MOUNTS[kind]
    mounts = [(src, opt) for src, t, opt in volume_mounts(lb) if t == target]
    assert mounts, f"{kind} config not mounted at {target}"
    src, opt = mounts[0]
    assert Path(src).name == fname and (ROOT / src).resolve() == ROOT / fname, f"mounted {src}, expected ./{fname}"
    assert "ro" in opt.split(","), "LB config must be mounted read-only"
    env = arena.service_env(lb)
    if kind == "nginx":
        assert env.get("NGINX_ENVSUBST_OUTPUT_DIR") == "/etc/nginx", "nginx template must be rendered to /etc/nginx"


def check_restart_policy(c):
    for name, s in services(c).items():
        assert s.get("restart") in ("unless-stopped", "always", "on-failure"), f"{name} has no restart policy"


def check_matches_arena(c):
    svcs = services(c)
    apps = app_services(c)
    assert tuple(sorted(apps)) == tuple(sorted(arena.INSTANCES)), f"instances {sorted(apps)} vs arena {arena.INSTANCES}"
    assert set(svcs) == {arena.LB_SERVICE, *arena.INSTANCES}, f"services {sorted(svcs)} vs arena"
    lb = svcs[arena.LB_SERVICE]
    assert sorted(arena.service_env(lb)) == sorted(
        set(arena.LB_ENV_KEYS) | ({"NGINX_ENVSUBST_OUTPUT_DIR"} if lb_kind(lb) == "nginx" else set())
    ), f"LB environment {sorted(arena.service_env(lb))} vs arena {arena.LB_ENV_KEYS}"
    envs = {n: arena.service_env(apps[n]) for n in arena.INSTANCES}
    keysets = {n: sorted(e) for n, e in envs.items()}
    first = keysets[arena.INSTANCES[0]]
    assert all(k == first for k in keysets.values()), f"instances have different env keys: {keysets}"
    a = arena.Arena(lb_port=19999, default_port=18001, fallback_port=18002, run_dir="/nonexistent/run",
                    limits=False, env={"DEFAULT_PROCESSOR_URL": "", "FALLBACK_PROCESSOR_URL": "", "PURGE_TOKEN": ""})
    a._knobs = {k: v for k, v in envs[arena.INSTANCES[0]].items() if k not in arena.INSTANCE_ADDRESS_KEYS}
    sock_dir = arena.service_env(lb).get("SOCKET_DIR", "/sockets")
    for n in arena.INSTANCES:
        native = a.instance_env(n)
        assert sorted(native) == keysets[n], f"{n}: arena sets {sorted(native)}, compose {keysets[n]}"
        for key in arena.INSTANCE_ADDRESS_KEYS:
            # Same shape: arena paths are compose paths with the run dir for /sockets and /data.
            want = native[key].replace(str(a.run_dir), "@").replace("http://127.0.0.1:18001", "DEFAULT").replace(
                "http://127.0.0.1:18002", "FALLBACK")
            got = envs[n][key].replace(sock_dir, "@").replace("/data", "@").replace(
                CONTEST_PROCESSORS["DEFAULT_PROCESSOR_URL"], "DEFAULT").replace(
                CONTEST_PROCESSORS["FALLBACK_PROCESSOR_URL"], "FALLBACK")
            assert got == want, f"{n}: {key}={envs[n][key]!r} does not match the arena's {native[key]!r}"
        for key, value in envs[n].items():
            if key not in arena.INSTANCE_ADDRESS_KEYS:
                assert native[key] == value, f"{n}: knob {key}={value!r} not passed on by the arena"
    journals = [envs[n]["JOURNAL_PATH"] for n in arena.INSTANCES]
    assert len(set(journals)) == len(journals), "JOURNAL_PATH must differ per instance"


CHECKS = [
    check_cpu_total,
    check_memory_total,
    check_limits_everywhere,
    check_port_9999,
    check_bridge_networks,
    check_no_host_mode,
    check_no_privileged,
    check_no_replicas,
    check_external_network,
    check_instances_behind_lb,
    check_lb_config_mounted,
    check_restart_policy,
    check_matches_arena,
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__)
def test_compose(check):
    check(arena.parse_compose(COMPOSE_TEXT))


# --------------------------------------------------------------------------
# mutations: each broken copy of the compose text must fail its check


def _sub(pattern, repl, count=0, flags=re.M):
    def mutate(text):
        new, n = re.subn(pattern, repl, text, count=count, flags=flags)
        assert n, f"mutation pattern {pattern!r} no longer matches docker-compose.yml"
        return new

    return mutate


def _in_service(service, line):
    """Insert a line (at service-key indentation) right after '  <service>:'."""
    return _sub(rf"^(  {re.escape(service)}:\n)", rf"\g<1>    {line}\n", count=1)


def _drop_service_line(service, key_pattern):
    """Remove the first line matching key_pattern inside a service's block."""

    def mutate(text):
        m = re.search(rf"^  {re.escape(service)}:\n((?:    .*\n|\s*\n)*)", text, re.M)
        assert m, f"service {service} not found"
        block = m.group(1)
        new_block, n = re.subn(key_pattern, "", block, count=1, flags=re.M)
        assert n, f"{key_pattern!r} not found in {service}"
        return text[: m.start(1)] + new_block + text[m.end(1) :]

    return mutate


def _rename_service(old, new):
    return _sub(rf"^  {old}:$", f"  {new}:", count=1)


MUTATIONS = [
    ("cpus-over", _sub(r'cpus: "?[0-9.]+"?', 'cpus: "0.6"'), check_cpu_total),
    ("memory-over", _sub(r"memory: \S+", "memory: 200MB"), check_memory_total),
    ("memory-in-gigabytes", _sub(r"memory: \S+", "memory: 1g", count=1), check_memory_total),
    ("limits-missing", _sub(r"^(\s+)limits:$", r"\1reservations:", count=1), check_limits_everywhere),
    ("memory-limit-missing", _drop_service_line("api2", r"^ +memory: .*\n"), check_limits_everywhere),
    ("port-not-9999", _sub(r'"9999:9999"', '"8080:9999"'), check_port_9999),
    ("api-publishes-port", _in_service("api1", 'ports: ["8080:8080"]'), check_port_9999),
    ("network-driver-host", _sub(r"driver: bridge", "driver: host"), check_bridge_networks),
    ("network-mode-host", _in_service("api1", "network_mode: host"), check_no_host_mode),
    ("lb-network-mode-host", _in_service(arena.LB_SERVICE, "network_mode: host"), check_no_host_mode),
    ("privileged", _in_service("api2", "privileged: true"), check_no_privileged),
    ("replicas", _sub(r"^(  api1:\n(?:    .*\n)*?    deploy:\n)", r"\g<1>      replicas: 2\n", count=1), check_no_replicas),
    ("external-false", _sub(r"external: true", "external: false"), check_external_network),
    ("api-off-processor-network", _drop_service_line("api2", r"^ +- payment-processor\n"), check_external_network),
    ("processor-url-local", _sub(r"http://payment-processor-default:8080", "http://localhost:8001", count=1), check_external_network),
    ("one-instance-behind-lb", _sub(r"LISTEN: unix:/sockets/api2.sock", "LISTEN: unix:/sockets/api9.sock"), check_instances_behind_lb),
    ("lb-not-depending", _drop_service_line(arena.LB_SERVICE, r"^ +- api2\n"), check_instances_behind_lb),
    ("socket-volume-not-shared", _drop_service_line("api1", r"^ +- sockets:/sockets\n"), check_instances_behind_lb),
    ("app-not-built", _sub(r"^    build: \.\n", "", count=1), check_instances_behind_lb),
    ("lb-config-elsewhere", _sub(r"\./haproxy\.cfg:", "./conf/haproxy.cfg:"), check_lb_config_mounted),
    ("lb-config-writable", _sub(r"(haproxy\.cfg):ro", r"\1"), check_lb_config_mounted),
    ("lb-image-latest", _sub(r"image: haproxy:\S+", "image: haproxy:latest"), check_lb_config_mounted),
    ("restart-missing", _drop_service_line("api2", r"^    restart: .*\n"), check_restart_policy),
    ("instance-renamed", _rename_service("api2", "api3"), check_matches_arena),
    ("instance-env-key-missing", _drop_service_line("api2", r"^      JOURNAL_PATH: .*\n"), check_matches_arena),
    ("knob-on-one-instance", _sub(r"^(      INSTANCE_ID: api1\n)", r'\g<1>      IN_FLIGHT_CAP: "8"\n'), check_matches_arena),
    ("same-journal", _sub(r"/data/api2\.journal", "/data/api1.journal"), check_matches_arena),
    ("peers-wrong", _sub(r"PEERS: unix:/sockets/api2.sock", "PEERS: unix:/sockets/api1.sock"), check_matches_arena),
    ("lb-env-key-missing", _drop_service_line(arena.LB_SERVICE, r"^      SOCKET_DIR: .*\n"), check_matches_arena),
    ("extra-service", _sub(r"^volumes:", "  redis:\n    image: redis:7-alpine\nvolumes:"), check_matches_arena),
]


def test_every_check_has_a_mutation():
    assert {f for _, _, f in MUTATIONS} == set(CHECKS)


@pytest.mark.parametrize("mutate,check", [m[1:] for m in MUTATIONS], ids=[m[0] for m in MUTATIONS])
def test_check_catches_mutation(mutate, check):
    broken = mutate(COMPOSE_TEXT)
    assert broken != COMPOSE_TEXT
    compose = arena.parse_compose(broken)
    with pytest.raises(AssertionError):
        check(compose)


def test_parse_memory():
    assert arena.parse_memory("160MB") == 160 * 2**20
    assert arena.parse_memory("30m") == 30 * 2**20
    assert arena.parse_memory("1g") == 2**30
    assert arena.parse_memory("1.5GB") == 3 * 2**29
    assert arena.parse_memory(1024) == 1024
    with pytest.raises(ValueError):
        arena.parse_memory("lots")


# --------------------------------------------------------------------------
# load balancer configs


def test_haproxy_cfg_content():
    text = (ROOT / "haproxy.cfg").read_text()
    lines = [ln.split("#")[0].strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    assert "mode http" in lines
    assert "http-reuse always" in lines
    assert "nbthread 1" in lines
    assert "balance roundrobin" in lines
    assert not [ln for ln in lines if re.match(r"(log|option\s+httplog|option\s+tcplog)\b", ln)], "no logging"
    assert "no log" in lines
    assert not [ln for ln in lines if ln.startswith("option httpclose") or ln.startswith("option http-server-close")]
    assert re.search(r'bind\s+"\$\{LB_HOST\}:\$\{LB_PORT\}"', text)
    assert len(re.findall(r'^\s*server\s+api\d\s+"unix@\$\{SOCKET_DIR\}/api\d\.sock"', text, re.M)) == 2


def test_nginx_conf_content():
    text = (ROOT / "nginx.conf").read_text()
    body = "\n".join(ln.split("#")[0] for ln in text.splitlines())
    assert re.search(r"^\s*worker_processes\s+1;", body, re.M)
    assert re.search(r"^\s*access_log\s+off;", body, re.M)
    assert re.search(r"proxy_http_version\s+1\.1;", body)
    assert re.search(r'proxy_set_header\s+Connection\s+"";', body)
    assert re.search(r"^\s*keepalive\s+\d+;", body, re.M)
    assert re.search(r"listen\s+\$\{LB_HOST\}:\$\{LB_PORT\};?", body) or re.search(r"listen\s+\$\{LB_HOST\}:\$\{LB_PORT\}\s", body)
    assert len(re.findall(r"server\s+unix:\$\{SOCKET_DIR\}/api\d\.sock;", body)) == 2
    # The image's envsubst would replace any set name: only our variables may appear.
    names = set(re.findall(r"\$\{?(\w+)", text))
    assert names <= set(arena.LB_ENV_KEYS), f"unexpected $ variables {names - set(arena.LB_ENV_KEYS)}"


def _lb_binary(kind):
    try:
        return arena.ensure_lb_binary(kind, lambda m: None)  # apt-get install when missing and root
    except arena.ArenaError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("env_from", ["compose", "arena"])
def test_haproxy_config_valid(tmp_path, env_from):
    exe = _lb_binary("haproxy")
    if env_from == "compose":
        env = arena.service_env(arena.load_compose()["services"][arena.LB_SERVICE])
        env["LB_PORT"] = "9999"
    else:
        env = {"LB_HOST": "127.0.0.1", "LB_PORT": "19999", "SOCKET_DIR": str(tmp_path)}
    r = subprocess.run([exe, "-c", "-f", str(ROOT / "haproxy.cfg")], env=dict(os.environ, **env),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[WARNING]" not in r.stdout + r.stderr, r.stdout + r.stderr


@pytest.mark.parametrize("env_from", ["compose", "arena"])
def test_nginx_config_valid(tmp_path, env_from):
    exe = _lb_binary("nginx")
    if env_from == "compose":
        env = {k: "/sockets" if k == "SOCKET_DIR" else v for k, v in
               arena.service_env(arena.load_compose()["services"][arena.LB_SERVICE]).items()}
    else:
        env = {"LB_HOST": "127.0.0.1", "LB_PORT": "19999", "SOCKET_DIR": str(tmp_path)}
    conf = tmp_path / "nginx.conf"
    conf.write_text(arena.render_template((ROOT / "nginx.conf").read_text(), env))
    rendered = [ln.split("#")[0] for ln in conf.read_text().splitlines()]
    assert not [ln for ln in rendered if "$" in ln], "unsubstituted variables"
    r = subprocess.run([exe, "-t", "-c", str(conf), "-e", "stderr", "-g", f"pid {tmp_path}/nginx.pid;"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[warn]" not in r.stderr, r.stderr


# --------------------------------------------------------------------------
# Dockerfile


def test_dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and all(f.startswith("python:3.11-slim") for f in froms), froms
    final = text[text.rindex("\nFROM ") :]
    user = re.findall(r"^USER\s+(\S+)", final, re.M)
    assert user and user[-1] not in ("root", "0"), "final stage must run as a non-root user"
    assert re.search(r'^CMD \["python", "rinha.py"\]\s*$', final, re.M)
    assert re.search(r"^COPY\s+rinha\.py\s", final, re.M)
    assert not re.search(r"apt-get|gcc|build-essential", final), "no compilers in the final image"
    assert "requirements.txt" in text
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][\w.]*", line), f"unpinned requirement {line!r}"
    ignore = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", "bench/out", "run", ".git"):
        assert entry in ignore, f".dockerignore misses {entry}"


def test_dockerfile_prepares_volume_mount_points():
    """A fresh named volume takes the ownership of the image's mount point: the
    directories the instances write to (sockets, journals) must belong to the
    image's non-root user."""
    text = (ROOT / "Dockerfile").read_text()
    final = text[text.rindex("\nFROM ") :]
    user = re.findall(r"^USER\s+(\S+)", final, re.M)[-1]
    compose = arena.load_compose()
    for name, svc in app_services(compose).items():
        for src, target, _ in volume_mounts(svc):
            if src.startswith((".", "/")):
                continue  # bind mount
            assert re.search(rf"mkdir -p [^\n]*{re.escape(target)}\b", final), f"{target} not created in the image"
            assert re.search(rf"chown {re.escape(user)}:\S+ [^\n]*{re.escape(target)}\b", final), \
                f"{target} not owned by {user} in the image"


# --------------------------------------------------------------------------
# the native arena


def _need_arena_files():
    missing = [p for p in (arena.RINHA, arena.PROCESSOR) if not p.exists()]
    if missing:
        pytest.skip("arena smoke test needs " + ", ".join(str(p.relative_to(ROOT)) for p in missing))


def _arena(tmp_path, lb):
    _need_arena_files()
    try:
        arena.ensure_lb_binary(lb, lambda m: None)
    except arena.ArenaError as exc:
        pytest.skip(str(exc))
    a = arena.Arena(lb_port=0, default_port=0, fallback_port=0, run_dir=tmp_path / "run", lb=lb,
                    env={"DEFAULT_PROCESSOR_URL": "", "FALLBACK_PROCESSOR_URL": "", "PURGE_TOKEN": "t0k"},
                    start_timeout=60)
    a.start()
    return a


@pytest.fixture(params=["haproxy", "nginx"])
def running_arena(request, tmp_path):
    a = _arena(tmp_path, request.param)
    try:
        yield a
    finally:
        a.stop()


@pytest.fixture
def haproxy_arena(tmp_path):
    a = _arena(tmp_path, "haproxy")
    try:
        yield a
    finally:
        a.stop()


def _summary(a):
    status, body = arena.http_request(a.url, "GET", "/payments-summary", timeout=5)
    assert status == 200, (status, body)
    data = json.loads(body)
    assert set(data) >= {"default", "fallback"}
    return data


def test_arena_serves_every_path(running_arena):
    a = running_arena
    cid = str(uuid.uuid4())
    status, body = arena.http_request(a.url, "POST", "/payments", body={"correlationId": cid, "amount": 19.9}, timeout=5)
    assert 200 <= status < 300, (status, body)
    deadline = time.monotonic() + 10
    while _summary(a)["default"]["totalRequests"] + _summary(a)["fallback"]["totalRequests"] < 1:
        assert time.monotonic() < deadline, "payment never reported in the summary"
        time.sleep(0.1)
    status, body = arena.http_request(a.url, "GET", "/health", timeout=5)
    assert status == 200, (status, body)
    # Purge goes through the LB too (token from the env passed to the arena).
    status, _ = arena.http_request(a.url, "POST", "/purge-payments", headers={"X-Rinha-Token": "t0k"}, timeout=5)
    assert 200 <= status < 300, status
    status, _ = arena.http_request(a.url, "POST", "/purge-payments", timeout=5)
    assert status not in (502, 503, 504), status
    # The emulators are reachable where the instances were told they are.
    status, _ = arena.http_request(a.default_url, "GET", "/admin/payments-summary",
                                   headers={"X-Rinha-Token": "123"}, timeout=5)
    assert status == 200


def test_arena_restarts_killed_instance(haproxy_arena):
    a = haproxy_arena
    old = a.children["api1"].pid
    new = a.kill_instance("api1", wait=True, timeout=30)
    assert new and new != old
    assert a.stats()["processes"]["api1"]["restarts"] == 1
    for _ in range(4):  # both instances answer through the LB again
        cid = str(uuid.uuid4())
        status, body = arena.http_request(a.url, "POST", "/payments", body={"correlationId": cid, "amount": 1.0}, timeout=5)
        assert 200 <= status < 300, (status, body)
        _summary(a)


def test_summary_through_both_instances_after_peer_restart(haproxy_arena):
    a = haproxy_arena
    for _ in range(4):  # round robin: both instances open their peer connections
        _summary(a)
    a.kill_instance("api2", wait=True, timeout=30)
    cid = str(uuid.uuid4())
    status, body = arena.http_request(a.url, "POST", "/payments", body={"correlationId": cid, "amount": 19.9}, timeout=5)
    assert 200 <= status < 300, (status, body)
    # Once confirmed, it is counted once by each instance: four summaries in a row (round robin).
    deadline = time.monotonic() + 10
    while True:
        summaries = [_summary(a) for _ in range(4)]
        counts = [(s["default"]["totalRequests"] + s["fallback"]["totalRequests"],
                   s["default"]["totalAmount"] + s["fallback"]["totalAmount"]) for s in summaries]
        if counts == [(1, 19.9)] * 4:
            break
        assert time.monotonic() < deadline, f"the payment is not counted by every instance: {counts}"
        time.sleep(0.1)


def test_the_null_instance_stands_in_for_rinha_behind_the_real_load_balancer(tmp_path):
    # bench/floor.py --behind null: the stack's shape with instances that do nothing.
    _need_arena_files()
    a = arena.Arena(lb_port=0, default_port=0, fallback_port=0, run_dir=tmp_path / "run",
                    env={"DEFAULT_PROCESSOR_URL": "", "FALLBACK_PROCESSOR_URL": ""},
                    instance_command=NULL_INSTANCE, output=False)
    a.start()
    try:
        assert all(a.children[name].argv[1:] == list(NULL_INSTANCE) for name in arena.INSTANCES)
        for _ in range(4):  # both instances, round-robin, on kept-alive server connections
            status, _ = arena.http_request(a.url, "POST", "/payments",
                                           body={"correlationId": str(uuid.uuid4()), "amount": 19.9}, timeout=5)
            assert status == 202
        assert _summary(a) == {"default": {"totalRequests": 0, "totalAmount": 0},
                               "fallback": {"totalRequests": 0, "totalAmount": 0}}
        assert arena.http_request(a.url, "POST", "/purge-payments", timeout=5)[0] == 200
        assert arena.http_request(a.url, "GET", "/internal/ready", timeout=5)[0] == 403  # haproxy's rule
        assert arena.http_request(f"unix:{a.socket_path('api1')}", "GET", "/internal/ready", timeout=5)[0] == 200
    finally:
        a.stop()


def test_arena_stats_and_cleanup(tmp_path):
    _need_arena_files()
    a = arena.Arena(lb_port=0, default_port=0, fallback_port=0, run_dir=tmp_path / "run",
                    env={"DEFAULT_PROCESSOR_URL": "", "FALLBACK_PROCESSOR_URL": ""})
    a.start()
    try:
        for _ in range(20):
            status, _ = arena.http_request(a.url, "POST", "/payments",
                                           body={"correlationId": str(uuid.uuid4()), "amount": 19.9}, timeout=5)
            assert 200 <= status < 300
        s = a.stats()
        for key in ("limits_applied", "limits_reason", "cgroup", "cpu_usage_s", "nr_periods", "nr_throttled",
                    "throttled_time_s", "memory_max_usage_bytes", "processes"):
            assert key in s
        assert set(s["processes"]) >= {arena.LB_SERVICE, *arena.INSTANCES}
        for name in (arena.LB_SERVICE, *arena.INSTANCES):
            assert s["processes"][name]["alive"] and s["processes"][name]["rss_bytes"] > 0
        if s["limits_applied"]:
            assert s["cpu_usage_s"] > 0 and s["memory_max_usage_bytes"] > 0
            assert s["cpu_limit"] == pytest.approx(1.5) and s["memory_limit_bytes"] == 350 * 2**20
            procs = (Path(s["cgroup"]["cpu"]) / "cgroup.procs").read_text().split()
            pids = {str(s["processes"][n]["pid"]) for n in (arena.LB_SERVICE, *arena.INSTANCES)}
            assert pids <= set(procs), "LB and instances run in the arena cgroup"
            emulator = str(s["processes"]["processor-default"]["pid"])
            assert emulator not in procs, "the emulators run outside the limits"
        pids = [c.pid for c in a.children.values()]
        cgroup_dirs = list((s["cgroup"] or {}).values())
    finally:
        a.stop()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    for d in cgroup_dirs:
        assert not Path(d).exists(), f"cgroup {d} left behind"
    assert not list((tmp_path / "run").glob("*.sock"))


def test_arena_main_stops_on_sigterm(tmp_path):
    """`python -m bench.arena` prints 'arena ready' and stops everything on SIGTERM."""
    _need_arena_files()
    port = arena.free_port()
    env = dict(os.environ, LB_PORT=str(port), ARENA_RUN_DIR=str(tmp_path / "run"), ARENA_LIMITS="0")
    # Emulators on the default ports might be taken by a `make run`: point at throwaway ones.
    dport, fport = arena.free_port(), arena.free_port()
    emus = [subprocess.Popen([sys.executable, str(arena.PROCESSOR), "--port", str(p), "--fee", fee],
                             stderr=subprocess.DEVNULL) for p, fee in ((dport, "0.05"), (fport, "0.15"))]
    env["DEFAULT_PROCESSOR_URL"] = f"http://127.0.0.1:{dport}"
    env["FALLBACK_PROCESSOR_URL"] = f"http://127.0.0.1:{fport}"
    proc = subprocess.Popen([sys.executable, "-m", "bench.arena"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "arena ready" in line:
                break
        assert any("arena ready" in ln for ln in lines), "".join(lines)
        assert any(ln.startswith("api1 ") and "| " in ln for ln in lines), "child output is prefixed"
        status, _ = arena.http_request(f"http://127.0.0.1:{port}", "GET", "/payments-summary", timeout=5)
        assert status == 200
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            pytest.fail("arena did not stop within 90 s of SIGTERM; output:\n" + "".join(lines) + out)
        lines.append(out)
        assert proc.returncode == 0, "".join(lines)
        assert "arena stopped" in out
        assert not tcp_open("127.0.0.1", port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for e in emus:
            e.terminate()
        for e in emus:
            try:
                e.wait(30)
            except subprocess.TimeoutExpired:
                e.kill()
                e.wait()
