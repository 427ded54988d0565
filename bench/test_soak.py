"""bench/soak.py's generated history: the files it writes are rinha.py's ledgers, exactly."""
import random

import rinha
from bench.soak import OPEN_HIGH, OPEN_LOW, History, now_ms


def test_a_generated_history_is_read_by_rinha_ledger_with_the_generated_totals(tmp_path):
    history = History(20_000, now_ms(), seed=7)
    journals = {name: tmp_path / f"{name}.journal" for name in ("api1", "api2")}
    history.write(journals)
    ledgers = {"api1": [rinha.Ledger(f"{journals['api1']}.ledger"), rinha.Ledger(f"{journals['api1']}.replica-api2")],
               "api2": [rinha.Ledger(f"{journals['api2']}.ledger"), rinha.Ledger(f"{journals['api2']}.replica-api1")]}
    try:
        for own, replica in ledgers.values():
            assert own.count() + replica.count() == 20_000
            for ledger in (own, replica):   # everything saved and frozen: nothing in memory
                assert ledger.saved == ledger.count() and not any(len(times) for times, _ in ledger.tail)
        rng = random.Random(1)
        windows = [(OPEN_LOW, OPEN_HIGH), (history.start_ms, history.start_ms), (history.end_ms, history.end_ms)]
        windows += [sorted(rng.randint(history.start_ms - 10, history.end_ms + 10) for _ in range(2)) for _ in range(50)]
        for low, high in windows:
            for pair in ledgers.values():   # each instance answers for the whole backend
                got = [sum(part) for part in zip(*(ledger.totals(low, high) for ledger in pair))]
                assert got == history.totals(low, high)
    finally:
        for pair in ledgers.values():
            for ledger in pair:
                ledger.close()
