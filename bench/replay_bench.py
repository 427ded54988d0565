#!/usr/bin/env python3
"""How long a start takes with a long history: `python -m bench.replay_bench [confirmed]` (from the
repository's root, where it imports rinha.py).

Writes a ledger of `confirmed` payments (default 10,000,000: in its files, frozen, as a long run
leaves it) and a journal of 100,000 pending payments (A records, a tenth of them pinned by an S
record) to a temporary directory, then measures rinha.py's start-up path (open the ledger,
replay the journal, compact it) with that history and with none (median of 3 each). Prints one
line per figure.
"""
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid

import rinha

PENDING = 100_000
START_MS = 1_764_000_000_000
CHUNK = 1_000_000


def write_ledger(prefix, confirmed):
    ledger = rinha.Ledger(prefix)
    for start in range(0, confirmed, CHUNK):
        count = min(CHUNK, confirmed - start)
        ledger.extend(b"".join(rinha.LOG_ENTRY.pack(i % 2, START_MS + i, 1990) for i in range(start, start + count)))
        ledger.safe = [START_MS + start + count] * 2
        ledger.freeze()
    ledger.close()


def write_journal(path):
    with open(path, "wb") as out:
        for seq in range(PENDING):
            out.write(b"A %d %s 1990 %d\n" % (seq, str(uuid.uuid4()).encode(), START_MS + seq))
            if seq % 10 == 0:
                out.write(b"S %d 0 %d\n" % (seq, START_MS + seq))


def start_up(directory):
    """rinha.serve's start-up path, up to the listener: seconds."""
    config = rinha.Config(journal_path=os.path.join(directory, "journal"))
    started = time.perf_counter()
    ledger = rinha.Ledger(config.journal_path + ".ledger")
    recent = rinha.RecentIds(config.remembered_ids)
    journal = rinha.Journal(config.journal_path, config)
    pending, _ = journal.replay(ledger, recent)
    journal.open_compacted(ledger, pending, list(recent.order))
    seconds = time.perf_counter() - started
    assert len(pending) == PENDING
    os.close(journal.fd)
    ledger.close()
    return seconds


def main():
    confirmed = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000_000
    for history in (0, confirmed):
        directory = tempfile.mkdtemp()
        try:
            write_ledger(os.path.join(directory, "journal.ledger"), history)
            write_journal(os.path.join(directory, "journal"))
            seconds = [start_up(directory) for _ in range(3)]
            print(f"start-up with {history:,} confirmed and {PENDING:,} pending payments: "
                  f"{statistics.median(seconds):.3f} s (median of 3; {min(seconds):.3f}-{max(seconds):.3f})")
        finally:
            shutil.rmtree(directory)


if __name__ == "__main__":
    main()
