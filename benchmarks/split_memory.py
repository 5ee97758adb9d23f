"""Peak memory of `tpi split` against the size of the model it splits.

The split streams layer by layer, so its peak RSS should be about one layer's
full tensors plus their slices, far below the model size.

    python benchmarks/split_memory.py [--model DIR] [--world 3]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_result  # noqa: E402


def peak_rss_of(cmd: list[str], interval: float = 0.02) -> tuple[int, float, int]:
    """Run `cmd`; return (peak RSS bytes sampled with psutil, seconds, exit code)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(interval)
    return peak, time.perf_counter() - t0, proc.returncode


@click.command()
@click.option("--model", default=None, help="Model (default: the embedded SmolLM2-135M-Instruct).")
@click.option("--world", default=3, show_default=True)
@click.option("--out", default=None)
def main(model, world, out):
    from tpi.sources.model_registry import resolve_model

    model_dir = resolve_model(model, lambda m: click.echo(m, err=True))
    model_bytes = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    tpi = str(Path(sys.executable).parent / "tpi")
    with tempfile.TemporaryDirectory() as tmp:
        baseline, _, _ = peak_rss_of(
            [sys.executable, "-c", "import torch, safetensors, tpi.storage.split"]
        )
        peak, seconds, rc = peak_rss_of(
            [tpi, "split", str(model_dir), "--world", str(world), "--out", f"{tmp}/s"]
        )
        if rc != 0:
            raise SystemExit(f"split failed with exit code {rc}")
    data = {
        "model": str(model_dir),
        "world": world,
        "model_bytes": model_bytes,
        "split_peak_rss_bytes": peak,
        "python_torch_baseline_rss_bytes": baseline,
        "peak_over_baseline_bytes": peak - baseline,
        "peak_over_baseline_vs_model": round((peak - baseline) / model_bytes, 3),
        "seconds": round(seconds, 2),
    }
    click.echo(data)
    click.echo(f"wrote {write_result('split_memory', data, out)}")


if __name__ == "__main__":
    main()
