"""bench/RESULTS.md: what a row says about the run (date, commit, machine) and where rows and
sections go. Every tool that records a result writes it through here.
"""
from __future__ import annotations

import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from bench.common import BENCH, REPO

RESULTS = BENCH / "RESULTS.md"


def now():
    """The row's date: UTC, to the minute."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")


def git_commit():
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def machine():
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} x {model}"


def fmt(value, spec="", missing="-"):
    return missing if value is None else format(value, spec)


def insert_row(row, header, section="", path=RESULTS):
    """Put `row` after the last row of the table whose header line is `header`; when there is no
    such table, first append `section` (its heading and legend), the header and its separator."""
    lines = path.read_text().splitlines() if path.exists() else []
    if header in lines:
        at = lines.index(header) + 2
    else:
        if lines and lines[-1].strip():
            lines.append("")
        if section:
            lines += section.rstrip("\n").splitlines() + [""]
        lines += [header, "| " + " | ".join("---" for _ in header.strip("|").split("|")) + " |"]
        at = len(lines)
    while at < len(lines) and lines[at].startswith("|"):
        at += 1
    lines.insert(at, row)
    path.write_text("\n".join(lines) + "\n")


def insert_section(section, marker, first_use, anchor, path=RESULTS):
    """Insert the text `section` above the line `marker`. When the marker is not there yet, first
    insert `first_use` (a heading and legend that end with the marker) before the line that starts
    at `anchor` (a substring beginning with a newline), or at the end."""
    text = path.read_text()
    if marker not in text:
        at = text.find(anchor)
        at = at + 1 if at >= 0 else len(text)
        text = text[:at] + first_use + text[at:]
    text = text.replace(marker, section + "\n" + marker, 1)
    path.write_text(text)
