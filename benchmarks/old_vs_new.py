"""Two checkouts of tpi side by side: `tpi bench` of each, interleaved, in fresh
processes (single node, 2 threads, 128-token prompt, 64 new tokens), fp32, int8
and int4. Used to check that a restructuring made nothing slower.

    python benchmarks/old_vs_new.py --old DIR --old-module master.bench \\
        --new DIR [--new-module tpi.master.bench] [--rounds 5] [--lock FILE]

Each side runs `python -c "from MODULE import bench; bench()"` with the checkout
as its working directory (so its own `tpi` package is imported).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_result  # noqa: E402

RUN = "import sys; sys.argv = ['tpi bench'] + sys.argv[1:]; from {mod} import bench; bench()"


def _bench(cwd: str, module: str, quant: str, lock: str | None) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "b.json"
        cmd = [sys.executable, "-c", RUN.format(mod=module), "--quant", quant, "--threads", "2"]
        cmd += ["--prompt-tokens", "128", "--new-tokens", "64", "--out", str(out)]
        if lock:
            cmd = ["flock", lock, *cmd]
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, timeout=900)
        d = json.loads(out.read_text())
        return d["ttft_ms"], d["decode_ms_per_token"]


@click.command()
@click.option("--old", required=True, type=click.Path(file_okay=False))
@click.option("--old-module", default="master.bench", show_default=True)
@click.option("--new", required=True, type=click.Path(file_okay=False))
@click.option("--new-module", default="tpi.master.bench", show_default=True)
@click.option("--rounds", default=5, show_default=True)
@click.option("--lock", default=None)
@click.option("--out", default=None)
def main(old, old_module, new, new_module, rounds, lock, out):
    sides = {"old": (old, old_module), "new": (new, new_module)}
    raw: dict[str, dict[str, list]] = {}
    for quant in ("none", "int8", "int4"):
        for r in range(rounds):
            for side in ("old", "new") if r % 2 == 0 else ("new", "old"):
                got = _bench(*sides[side], quant, lock)
                raw.setdefault(quant, {}).setdefault(side, []).append(got)
                print(quant, r, side, got, flush=True)
    summary = {}
    for quant, by_side in raw.items():
        s = {
            side: {
                "ttft_ms_median": statistics.median(x[0] for x in v),
                "decode_ms_median": statistics.median(x[1] for x in v),
                # The least disturbed run of each side (a shared machine).
                "ttft_ms_min": min(x[0] for x in v),
                "decode_ms_min": min(x[1] for x in v),
            }
            for side, v in by_side.items()
        }
        s["decode_new_over_old_min"] = round(
            s["new"]["decode_ms_min"] / s["old"]["decode_ms_min"], 3
        )
        s["ttft_new_over_old_min"] = round(s["new"]["ttft_ms_min"] / s["old"]["ttft_ms_min"], 3)
        summary[quant] = s
    print(json.dumps(summary, indent=1))
    write_result("old_vs_new", {"old": old, "new": new, "summary": summary, "raw": raw}, out)


if __name__ == "__main__":
    main()
