"""Helpers shared by the benchmark scripts (machine description, JSON output, where
their files live)."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path

import click
import psutil
import torch

from tpi.paths import tpi_home

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def write_result(name: str, data: dict, out: str | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **data}, indent=2) + "\n")
    return path


def work_option(under_home: str, help: str):
    """--work: the script's working directory, by default `under_home` in $TPI_HOME."""
    return click.option(
        "--work",
        type=click.Path(file_okay=False, path_type=Path),
        default=tpi_home() / under_home,
        show_default=True,
        help=help,
    )
