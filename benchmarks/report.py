"""What every benchmark script records beside its figures: the machine, and the JSON file.

The scripts in benchmarks/ import this as a sibling module (`python benchmarks/NAME.py` puts
this folder on sys.path).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np


def machine_info() -> dict:
    """The CPU model (from /proc/cpuinfo on Linux), core count, OS, Python, NumPy and its BLAS."""
    cpu_model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    blas = "unknown"
    try:
        deps = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas = f"{deps['name']} {deps['version']}"
    except Exception:  # older NumPy, or a build that does not say
        pass
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": blas,
    }


def write_report(path, report: dict) -> None:
    """Write the report as indented JSON (creating the folder) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
