"""Fixtures shared by test_rinha.py and bench/: the processor emulators, rinha.py instances (one,
a peered pair, or any number with their own settings), each stopped at teardown whatever the
test did. An instance runs in-process (rinha.serve on its own event loop in a thread of the
test process) unless the test asks for a process (process=True): to kill, hang or signal it,
or to patch it with `code`. The harness they are built on is harness.py.

The `slow` marker: every test that starts a process (rinha.py, the emulator, haproxy, nginx, k6,
Docker) has it, given here at collection: by the fixtures it uses, or by name for the bench/
tests that start their processes themselves. `make test-fast` runs the others alone
(`pytest -m "not slow"`); `make test` runs everything."""
import pytest

from harness import InProcessInstance, Instance, Processor, free_port

# Fixtures that start processes: here, in test_rinha.py and in bench/test_*.py.
PROCESS_FIXTURES = {
    "processors", "fresh", "make_processor", "make_instance", "instance", "make_peers", "pair",
    "front", "balanced", "make_balancer", "pair_behind_haproxy",
    "shared_emulator", "emu", "running_arena", "haproxy_arena", "stack", "scenario",
}

# bench/ tests that start processes without such a fixture (by node id, parameters left off).
SLOW_BY_NAME = {
    "bench/test_chaos.py::test_seeded_chaos_run_keeps_every_accepted_payment_exactly_once_and_the_summary_exact",
    "bench/test_chaos.py::test_a_pinned_payment_settled_as_another_requests_duplicate_is_unpinned",
    "bench/test_chaos.py::test_an_id_sent_again_after_it_was_stored_is_not_stored_in_the_other_processor",
    "bench/test_chaos.py::test_two_copies_of_an_id_retried_together_on_one_instance_are_counted_once",
    "bench/test_deploy.py::test_haproxy_config_valid",
    "bench/test_deploy.py::test_nginx_config_valid",
    "bench/test_deploy.py::test_the_null_instance_stands_in_for_rinha_behind_the_real_load_balancer",
    "bench/test_deploy.py::test_arena_stats_and_cleanup",
    "bench/test_deploy.py::test_arena_main_stops_on_sigterm",
    "bench/test_processor.py::test_signal_stops_the_emulator_with_exit_status_0",
}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: starts processes (rinha.py, the emulator, haproxy, nginx, k6 or Docker); "
                   "`make test-fast` leaves these out")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())) or \
                item.nodeid.split("[")[0] in SLOW_BY_NAME:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def make_processor():
    """make_processor(fee, *options, port=None, unix=None): a private emulator, stopped at
    teardown."""
    started = []

    def make(fee, *extra, **where):
        started.append(Processor(fee, *extra, **where))
        return started[-1]
    yield make
    for processor in started:
        processor.process.stop()


@pytest.fixture(scope="module")
def processors():
    """The default (5 %) and fallback (15 %) emulators one test module shares."""
    default, fallback = Processor("0.05"), Processor("0.15")
    yield default, fallback
    default.process.stop()
    fallback.process.stop()


@pytest.fixture
def fresh(processors):
    """The shared emulators with no payments, no delay and no failure."""
    for processor in processors:
        processor.reset()
    return processors


def stop_all(instances):
    """Stop every instance (resumed first, in case a test left it paused or hung), even when
    stopping one fails; then raise the first failure."""
    failures = []
    for instance in instances:
        try:
            instance.resume()
            instance.stop()
        except Exception as error:  # the others are stopped all the same
            failures.append(error)
    if failures:
        raise failures[0]


@pytest.fixture
def make_instance(tmp_path, make_processor):
    """make_instance(name="api1", default=None, fallback=None, port=None, process=False,
    code=None, journal_dir=tmp_path, **env): an InProcessInstance, or with `process` (or
    `code`) an Instance, a child process (see harness.py); every one started (and restarted)
    is stopped at teardown, before any emulator make_processor started."""
    started = []

    def make(*args, journal_dir=None, process=False, **kwargs):
        kind = Instance if process or kwargs.get("code") else InProcessInstance
        started.append(kind(journal_dir or tmp_path, *args, **kwargs))
        return started[-1]
    yield make
    stop_all(started)


@pytest.fixture
def instance(fresh, make_instance):
    """One instance with the default settings, in front of the fresh shared emulators."""
    return make_instance("api1", *fresh)


@pytest.fixture
def make_peers(tmp_path, make_instance):
    """make_peers(default, fallback, count=2, sockets=False, process=False, **env): `count`
    instances api1, api2, ... on free ports, each with all the others as PEERS; with
    `sockets`, each listens on tmp_path/apiN.sock too (where haproxy.cfg looks for them);
    with `process`, each is a child process."""
    def make(default, fallback, count=2, sockets=False, process=False, **env):
        ports = [free_port() for _ in range(count)]
        instances = []
        for i, port in enumerate(ports):
            peers = ",".join(f"http://127.0.0.1:{p}" for p in ports if p != port)
            listen = {"LISTEN": f"127.0.0.1:{port},unix:{tmp_path}/api{i + 1}.sock"} if sockets else {}
            instances.append(make_instance(f"api{i + 1}", default, fallback, port=port, process=process,
                                           PEERS=peers, **listen, **env))
        return instances
    return make


@pytest.fixture
def pair(fresh, make_peers):
    """Two in-process instances, each the other's peer, in front of the fresh shared emulators."""
    return make_peers(*fresh)
