#!/usr/bin/env python3
"""How long a start takes with a large journal: `python -m bench.replay_bench` (from the repository's
root, where it imports rinha.py).

Writes a compacted journal of 1,000,000 confirmed payments (L records) and 100,000 pending ones
(A records, a tenth of them pinned by an S record) to a temporary directory, then measures
rinha.py's replay of it (median of 3), the start-up compaction, and the ledger copy that a
compaction while running begins with. Prints one line per figure.
"""
import os
import shutil
import statistics
import tempfile
import time
import uuid

import rinha

CONFIRMED, PENDING = 1_000_000, 100_000
START_MS = 1_764_000_000_000


def write_journal(path):
    with open(path, "wb") as out:
        out.writelines(b"L %d %d 1990\n" % (i % 2, START_MS + i) for i in range(CONFIRMED))
        for seq in range(PENDING):
            out.write(b"A %d %s 1990 %d\n" % (seq, str(uuid.uuid4()).encode(), START_MS + seq))
            if seq % 10 == 0:
                out.write(b"S %d 0 %d\n" % (seq, START_MS + seq))


def timed(work):
    started = time.perf_counter()
    result = work()
    return time.perf_counter() - started, result


def main():
    directory = tempfile.mkdtemp()
    try:
        path = os.path.join(directory, "journal")
        write_journal(path)
        replays = [timed(lambda: rinha.Journal(path, rinha.Config()).replay(rinha.Ledger(), rinha.RecentIds(rinha.Config().remembered_ids)))[0] for _ in range(3)]
        print(f"journal of {CONFIRMED:,} confirmed and {PENDING:,} pending payments, "
              f"{os.path.getsize(path) / 1e6:.1f} MB: replay {statistics.median(replays):.2f} s "
              f"(median of 3; {min(replays):.2f}-{max(replays):.2f})")
        journal, ledger = rinha.Journal(path, rinha.Config()), rinha.Ledger()
        pending, _ = journal.replay(ledger, rinha.RecentIds(rinha.Config().remembered_ids))
        assert len(pending) == PENDING and sum(ledger.window(p, 0, 1 << 62)[0] for p in (0, 1)) == CONFIRMED
        print(f"start-up compaction {timed(lambda: journal.open_compacted(ledger, pending))[0]:.2f} s")
        print(f"ledger copy {1000 * timed(ledger.copy)[0]:.1f} ms")
    finally:
        shutil.rmtree(directory)


if __name__ == "__main__":
    main()
