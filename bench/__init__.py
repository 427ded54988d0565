"""bench: the rigs around rinha.py (bench/README.md).

Every tool is a module run from the repository's root, `python -m bench.<tool>` (the Makefile's
targets do that): arena (`make run`), load, bench, scenarios, chaos, soak, docker, capacity,
floor, cpu, tailtrace, replay_bench. What they share is written once: common.py (paths, ports,
HTTP, /proc sampling, k6), results.py (RESULTS.md), floors.py (the servers rinha.py is measured
against), arena.py (the native stack). processor.py, the processor emulator, imports nothing of
the package: it also runs as a plain script (`python bench/processor.py`) and in its own image.
"""
