"""What checking every shard read costs: ms/token with the per-read crc32 on
and off (TPI_VERIFY_READS=0), in fresh `tpi bench` processes, interleaved.

The check matters most where layers stream from disk every token (a window
smaller than the model), so that is what is measured: the embedded SmolLM2,
window 2, fp32 and int4, and the same model held resident (the check then
runs once per layer, at load).

    python benchmarks/read_checks.py [--rounds 5]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import median, write_result  # noqa: E402

TPI = str(Path(sys.executable).parent / "tpi")


def _bench(split: Path, window: int | None, checked: bool, out: Path) -> dict:
    env = dict(os.environ, TPI_VERIFY_READS="1" if checked else "0")
    cmd = [TPI, "bench", "--model", str(split), "--new-tokens", "24", "--out", str(out)]
    if window:
        cmd += ["--window", str(window)]
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    report = json.loads(out.read_text())
    node = report["nodes"]["0"]
    return {
        "ms_per_token": report["decode_ms_per_token"],
        "load_s": report["load_seconds"],
        "disk_bytes_per_token": node["decode"]["per_token"]["disk_bytes"],
    }


@click.command()
@click.option("--rounds", default=5, show_default=True)
@click.option("--out", default=None)
def main(rounds: int, out: str | None) -> None:
    from tpi.quant.quantize import QuantSpec
    from tpi.sources.model_registry import resolve_model
    from tpi.storage.split import split_model

    model = resolve_model(None, lambda m: None)
    work = Path(tempfile.mkdtemp(prefix="tpi-readcheck-"))
    cases = []
    for quant in ("none", "int4"):
        split = split_model(model, work / quant, [1.0], quant=QuantSpec.for_split(quant))
        cases += [(f"{quant} window 2", split, 2), (f"{quant} resident", split, None)]
    runs: dict[str, dict[str, list[dict]]] = {name: {"on": [], "off": []} for name, *_ in cases}
    for r in range(rounds):
        for name, split, window in cases:
            for state in ("on", "off") if r % 2 == 0 else ("off", "on"):
                res = _bench(split, window, state == "on", work / "bench.json")
                runs[name][state].append(res)
                print(name, state, res, flush=True)
    summary = {}
    for name, by in runs.items():
        on = median([x["ms_per_token"] for x in by["on"]])
        off = median([x["ms_per_token"] for x in by["off"]])
        summary[name] = {
            "ms_per_token_checked": round(on, 2),
            "ms_per_token_unchecked": round(off, 2),
            "ratio_checked_over_unchecked": round(on / off, 3),
            "load_s_checked": round(median([x["load_s"] for x in by["on"]]), 3),
            "load_s_unchecked": round(median([x["load_s"] for x in by["off"]]), 3),
        }
    path = write_result("read_checks", {"rounds": rounds, "summary": summary, "runs": runs}, out)
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
