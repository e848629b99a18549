"""Results files in the one shape of RESULTS.md: command, commit, device, date, notes, rows."""

from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def gpu_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100``: the ``<gpu>`` of a benchmark's results file name."""
    found = re.search(r"\b([a-z]+\d{2,4}[a-z]?)\b", name.lower())
    return found.group(1) if found else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timers read the host clock)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def git_commit() -> str:
    """HEAD of this checkout (``+dirty`` with uncommitted changes); ``DISTILL_GIT_COMMIT`` wins where it is set, for
    copies of the tree whose ``.git`` is missing or stale (the GPU machine's)."""
    if os.environ.get("DISTILL_GIT_COMMIT"):
        return os.environ["DISTILL_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[1])
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parents[1]).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line() -> str:
    """The command that is running, as a user would type it from the repository root."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("distill", "cli.py")):
        argv[0] = "distill"
    elif argv and argv[0].endswith(".py"):
        argv = ["python", os.path.relpath(argv[0])] + argv[1:]
    return shlex.join(argv)


def write_results(path: str | Path, rows: list[dict[str, Any]], device: torch.device | str, notes: str = "",
                  append: bool = False) -> Path:
    """Write (or, with ``append``, extend) a results file; each row also records its own command and device."""
    path = Path(path)
    command, name = command_line(), device_name(device)
    rows = [{**row, "device": name, "command": command} for row in rows]
    if append and path.is_file():
        old = json.loads(path.read_text())
        rows = old.get("rows", []) + rows
        notes = old.get("notes", "") if not notes or notes == old.get("notes") else f"{old.get('notes', '')} {notes}"
    record = {"command": command, "git_commit": git_commit(), "device": name,
              "date": datetime.date.today().isoformat(), "notes": notes, "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path
