"""Two checkouts of tpi side by side: `tpi bench` of each, interleaved, in fresh
processes, on one node, tensor parallel over 3 ranks (`tpi cluster --workers 2`)
and a 3-stage pipeline (`--pp 3`). Used to check that a restructuring made
nothing slower.

    git worktree add /tmp/tpi-old <commit>
    python benchmarks/old_vs_new.py --old /tmp/tpi-old --new . [--rounds 5]
        [--quant none,int4] [--lock FILE]

Each side runs with its own checkout first on the Python path (a directory of
links that maps master/ and worker/ into the tpi namespace, as the installed
package does), from a neutral working directory, so the workers `tpi cluster`
starts import the same checkout as the master. Each side keeps its own cluster
directory (shards pushed once are reused); the rounds alternate which side
goes first.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_result  # noqa: E402

SETUPS = {
    "one node": [],
    "TP 3": ["cluster", "--workers", "2"],
    "PP 3": ["cluster", "--workers", "2", "--pp", "3"],
}


def shim(checkout: Path, into: Path) -> Path:
    """A directory whose `tpi` package is `checkout`'s tpi/ with master/ and worker/
    inside it, as setuptools' package-dir maps them when installed."""
    pkg = into / "tpi"
    pkg.mkdir(parents=True)
    for entry in (checkout / "tpi").iterdir():
        if entry.name not in ("master", "worker"):
            (pkg / entry.name).symlink_to(entry.resolve())
    (pkg / "master").symlink_to((checkout / "master").resolve())
    (pkg / "worker").symlink_to((checkout / "worker").resolve())
    return into


def _bench(path: Path, work: Path, setup: list[str], quant: str, lock: str | None) -> tuple:
    out = work / "b.json"
    cmd = [sys.executable, "-m", "tpi.cli", *setup]
    if setup:
        cmd += ["--dir", str(work / "cluster")]
    cmd += ["bench", "--quant", quant, "--prompt-tokens", "128", "--new-tokens", "64"]
    cmd += ["--out", str(out)]
    if not setup:
        cmd += ["--threads", "2"]
    if lock:
        cmd = ["flock", lock, *cmd]
    env = {**os.environ, "PYTHONPATH": str(path)}
    subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True, timeout=1800)
    d = json.loads(out.read_text())
    return d["ttft_ms"], d["decode_ms_per_token"]


def _summary(by_side: dict[str, list]) -> dict:
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
    for what in ("decode", "ttft"):
        for stat in ("min", "median"):
            key = f"{what}_ms_{stat}"
            s[f"{what}_new_over_old_{stat}"] = round(s["new"][key] / s["old"][key], 3)
    return s


@click.command()
@click.option("--old", required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--new", required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--rounds", default=5, show_default=True)
@click.option("--quant", default="none", show_default=True, help="Comma-separated quant modes.")
@click.option("--setups", default=",".join(SETUPS), show_default=True)
@click.option("--lock", default=None, help="flock this file around each run.")
@click.option("--note", default="", help="Recorded with the result (e.g. other load seen).")
@click.option("--out", default=None)
def main(old, new, rounds, quant, setups, lock, note, out):
    raw: dict[str, dict[str, list]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sides = {}
        for side, checkout in (("old", old), ("new", new)):
            work = root / side
            work.mkdir()
            sides[side] = (shim(Path(checkout), root / f"{side}-path"), work)
        for name in setups.split(","):
            for q in quant.split(","):
                key = f"{name} {q}"
                for r in range(rounds):
                    for side in ("old", "new") if r % 2 == 0 else ("new", "old"):
                        path, work = sides[side]
                        got = _bench(path, work, SETUPS[name], q, lock)
                        raw.setdefault(key, {}).setdefault(side, []).append(got)
                        print(key, r, side, got, flush=True)
    summary = {key: _summary(by_side) for key, by_side in raw.items()}
    print(json.dumps(summary, indent=1))
    write_result(
        "old_vs_new",
        {"old": old, "new": new, "note": note, "summary": summary, "raw": raw},
        out,
    )


if __name__ == "__main__":
    main()
