"""The submission on a real Docker engine (part of `make test`; about a minute with a warm cache).

bench/docker.py installs the engine when missing (apt, PyPI), starts dockerd when none answers
(and stops it again at the end, restoring the host), builds the stand-in base images once, then
runs docker-compose.yml unchanged under a compose project of its own: the override file only
publishes the load balancer on a free 127.0.0.1 port and gives the emulators' external network
a name of its own (the emulator containers carry the contest's names as network aliases), so
that `make run` and `make docker` may run at the same time. On that stack: a short contest
scenario through the load balancer, the limits and users Docker applied, the journals on their
volume, an instance SIGKILLed and restarted by the restart policy, `docker stop` of an instance
with a backlog, and the image built once.
"""
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from bench import arena
from bench import docker as engine  # bench/docker.py, not the Docker SDK
from bench.common import BENCH, REPO

PHASES = BENCH / "phases" / "short.json"
DURATION_S = 20
MAX_REQUESTS = 100
BACKLOG = 40                 # payments queued before a kill or a stop
SETTLE_S = 90.0              # for queued payments to reach the processors once they are healthy
RESTART_S = 60.0             # for the restart policy to bring an instance back
SHUTDOWN_GRACE_S = 10.0      # rinha.py's default drain on SIGTERM
INSTANCE_UID = 10001         # the Dockerfile's user rinha
LB_UID = 99                  # the official haproxy image's user haproxy


@pytest.fixture(scope="module")
def stack():
    if os.geteuid() != 0 and not engine.engine_answers():
        pytest.skip("no Docker engine answers and this is not root (cannot install or start one)")
    owner = f"test-{os.getpid()}"
    started = engine.prepare(owner)
    project = f"rinhatest{secrets.token_hex(3)}"
    stack = engine.Stack(project=project, lb_port=0, admin_ports={"default": 0, "fallback": 0},
                         isolated=True, purge_token=secrets.token_hex(8))
    stack.test_owner, stack.test_started_dockerd = owner, started
    try:
        stack.up()
        yield stack
    finally:
        if engine.engine_answers():
            stack.down()  # again, when the last test did not get that far
        if started:
            engine.Dockerd().stop(owner=owner)


def admin(stack, name, method, path, body=None):
    headers = {"X-Rinha-Token": stack.token}
    url = f"{stack.admin_url(name)}{path}"
    if method == "GET":
        return json.loads(engine.http_get(url, timeout=5, headers=headers)[1])
    request = engine.urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else b"",
                                            method=method, headers={"Content-Type": "application/json", **headers})
    with engine.urllib.request.urlopen(request, timeout=5) as response:
        return response.status


def set_failing(stack, failing):
    for name in engine.PROCESSORS:
        admin(stack, name, "PUT", "/admin/configurations/failure", {"failure": failing})


def purge_all(stack):
    for name in engine.PROCESSORS:
        admin(stack, name, "POST", "/admin/purge-payments")
    status, body = engine.http_post(f"{stack.url}/purge-payments", None, headers={"X-Rinha-Token": stack.purge_token})
    assert status == 200, body


def post_payments(stack, count):
    amounts = []
    for i in range(count):
        amount = round(10 + i * 0.01, 2)
        status, body = engine.http_post(f"{stack.url}/payments", {"correlationId": str(uuid.uuid4()), "amount": amount})
        assert status in (200, 202), (status, body)
        amounts.append(amount)
    return amounts


def totals(stack):
    """(backend summary requests, processors' requests) over both processors."""
    _, body = engine.http_get(f"{stack.url}/payments-summary", timeout=5)
    summary = json.loads(body)
    backend = summary["default"]["totalRequests"] + summary["fallback"]["totalRequests"]
    processors = sum(admin(stack, name, "GET", "/admin/payments-summary")["totalRequests"] for name in engine.PROCESSORS)
    return backend, processors


def wait_settled(stack, expected, timeout=SETTLE_S):
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        try:
            seen = totals(stack)
        except OSError:
            seen = None
        if seen == (expected, expected):
            return seen
        time.sleep(0.5)
    return seen


def wait_restarted(stack, service, old_pid, old_restarts, timeout=RESTART_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = stack.inspect(service)
        if state["State"]["Running"] and state["State"]["Pid"] not in (0, old_pid) \
                and state["RestartCount"] > old_restarts:
            stack.wait_ready()
            return state
        time.sleep(0.2)
    raise AssertionError(f"{service} was not restarted within {timeout}s\n{stack.logs_tail()}")


def proc_uid(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid for pid {pid}")


def test_short_scenario_through_the_compose_stack_loses_nothing(stack, tmp_path):
    log_path = tmp_path / "k6.log"
    result = engine.run_bench(stack, phases=PHASES, out_dir=tmp_path / "out", log_path=log_path,
                              max_requests=MAX_REQUESTS, duration_s=DURATION_S, timeout_s=180)
    explain = json.dumps(result, indent=1) + "\n" + "\n".join(log_path.read_text().splitlines()[-20:]) \
        + "\n" + stack.logs_tail()
    assert result["teardown_ok"], explain
    assert result["successful_posts"] > 500, explain
    assert result["failed_posts"] == 0, explain
    assert result["inconsistencies"] == 0, explain
    assert result["lag"] == 0, explain
    assert result["default"]["totalRequests"] == result["default"]["processorTotalRequests"], explain
    assert result["fallback"]["totalRequests"] == result["fallback"]["processorTotalRequests"], explain
    # The bench's figures come from each container's own cgroup, within the compose limits.
    limits = arena.compose_limits()
    assert set(result["containers"]) == set(limits), explain
    for service, figures in result["containers"].items():
        assert figures["cpu_s"] > 0, (service, figures)
        assert 0 < figures["peak_memory_bytes"] <= limits[service][1], (service, figures)
    assert result["cpu_s_per_payment"] > 0


def test_docker_applies_the_compose_limits_restart_policy_and_users(stack):
    limits = arena.compose_limits()
    compose = arena.load_compose()
    assert set(limits) == {engine.LB_SERVICE, *engine.INSTANCES}
    for service, (cpus, memory) in limits.items():
        info = stack.inspect(service)
        host = info["HostConfig"]
        assert host["NanoCpus"] == round(cpus * 1e9), (service, host["NanoCpus"])
        assert host["Memory"] == memory, (service, host["Memory"])
        assert host["RestartPolicy"]["Name"] == compose["services"][service]["restart"]
        assert info["State"]["Running"], service
    for service in engine.INSTANCES:
        info = stack.inspect(service)
        assert info["Config"]["User"] == "rinha"
        assert proc_uid(info["State"]["Pid"]) == INSTANCE_UID, service
    lb = stack.inspect(engine.LB_SERVICE)
    assert proc_uid(lb["State"]["Pid"]) == LB_UID


def test_journals_land_on_their_volume(stack):
    post_payments(stack, 10)
    volume = json.loads(engine.docker("volume", "inspect", f"{stack.project}_journals"))[0]
    data = Path(volume["Mountpoint"])
    for service in engine.INSTANCES:
        info = stack.inspect(service)
        mounts = {m["Destination"]: m for m in info["Mounts"]}
        assert mounts["/data"]["Type"] == "volume" and mounts["/data"]["Name"] == volume["Name"], mounts
        env = dict(item.split("=", 1) for item in info["Config"]["Env"])
        journal = data / Path(env["JOURNAL_PATH"]).name
        assert Path(env["JOURNAL_PATH"]).parent == Path("/data")
        assert journal.is_file() and journal.stat().st_size > 0, f"{service}: {journal} missing or empty"
        assert journal.stat().st_uid == INSTANCE_UID


@contextlib.contextmanager
def backlog(stack):
    """BACKLOG payments queued in the instances (the processors failing) for the block; then the
    processors healthy again, and every one of them stored once in the end."""
    purge_all(stack)
    set_failing(stack, True)
    try:
        post_payments(stack, BACKLOG)
        yield
    finally:
        set_failing(stack, False)
    assert wait_settled(stack, BACKLOG) == (BACKLOG, BACKLOG), stack.logs_tail()


def test_sigkilled_instance_is_restarted_by_the_restart_policy_and_loses_nothing(stack):
    with backlog(stack):
        before = stack.inspect("api1")
        os.kill(before["State"]["Pid"], signal.SIGKILL)  # the instance process, from the host
        after = wait_restarted(stack, "api1", before["State"]["Pid"], before["RestartCount"])
        assert after["State"]["Running"]


def test_docker_stop_with_a_backlog_exits_0_within_the_grace(stack):
    # What api1 could not deliver before stopping was journaled and goes out after the start.
    with backlog(stack):
        container = stack.container("api1")
        info = stack.inspect("api1")
        # Docker's grace (stop_grace_period, else 10 s) must outlast rinha.py's drain.
        grace = info["Config"].get("StopTimeout") or 10
        stopped = subprocess.run(["docker", "stop", container], capture_output=True, text=True,
                                 timeout=grace + 30)
        assert stopped.returncode == 0, stopped.stderr
        state = stack.inspect("api1")["State"]
        assert not state["Running"]
        assert state["ExitCode"] == 0, f"exit code {state['ExitCode']} (137: SIGKILLed at the end of " \
            f"Docker's {grace}s grace while draining for up to {SHUTDOWN_GRACE_S}s)"
        assert not state["OOMKilled"]
        engine.docker("start", container)
        stack.wait_ready()


def test_compose_builds_the_image_once(stack):
    proc = subprocess.run(stack.compose_argv("--progress", "plain", "build"), capture_output=True, text=True,
                          timeout=engine.COMMAND_TIMEOUT_S, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    built = re.findall(r"^\s*(?:Service\s+)?(\S+)\s+Built\s*$", out, re.M)
    assert len(built) == 1, f"compose built the image {len(built)} times ({built}):\n{out[-2000:]}"
    ids = {stack.inspect(service)["Image"] for service in engine.INSTANCES}
    assert len(ids) == 1, f"the instances run different images: {ids}"


def leftovers(stack):
    """What of the stack is still on the engine: compose-labelled objects, emulators, network."""
    project = f"label=com.docker.compose.project={stack.project}"
    found = {
        "containers": engine.docker("ps", "-aq", "--filter", project).split(),
        "volumes": engine.docker("volume", "ls", "-q", "--filter", project).split(),
        "networks": engine.docker("network", "ls", "-q", "--filter", project).split(),
        "emulators": engine.docker("ps", "-aq", "--filter", f"label={engine.OWNER_LABEL}={stack.project}").split(),
        "emulator network": engine.docker("network", "ls", "-q", "--filter", f"name=^{stack.network}$").split(),
    }
    return {k: v for k, v in found.items() if v}


# Last: takes the stack down (as `make docker-down` does).
def test_down_removes_the_stack_and_a_dockerd_started_here_leaves_the_host_as_it_was(stack):
    assert leftovers(stack), "the stack should be up before down"
    stack.down()
    assert leftovers(stack) == {}
    if not stack.test_started_dockerd:
        return  # an engine was already running: it is not ours to stop
    before = engine.Dockerd.state()["host"]
    assert engine.Dockerd().stop(owner=stack.test_owner)
    assert not engine.engine_answers()
    assert engine.host_snapshot() == before
