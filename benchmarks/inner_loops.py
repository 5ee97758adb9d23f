"""Static analysis of the int8 and int4 decode kernels' inner loops: instructions and
cycles per iteration from llvm-mca, for AArch64 (a Raspberry Pi 5's Cortex-A76, and
the Pi 4's Cortex-A72 without dot products) next to x86, and what they mean for a
Pi's decode: the bytes of weights a core can consume per cycle, times 4 cores at
2.4 GHz, against the Pi 5's ~17 GB/s of memory bandwidth (LPDDR4X-4267, 32 bits).

Each kernel is compiled as tpi.kernels.build compiles it (the same -O3 and -march;
AArch64 with the cross compiler), the loop found in the assembly (the smallest
backward branch around the instructions that loop is made of: e.g. 8 SDOTs for
4 int8 weight rows against one row of x), and that body given to llvm-mca as a
steady-state loop. LLVM's scheduling models: Neoverse-N1 for the Cortex-A76 (the
same core design; LLVM models the A76 itself with the Cortex-A57's tables),
Cortex-A57 for the Cortex-A72 (the A72's is not modelled either; the A57 is its
predecessor), Zen 4 for this x86 machine (AVX-512 with bfloat16 dot products) and
Alder Lake for an AVX2 laptop. A static model ignores the memory system: these are
the most each loop can consume, to compare with what memory delivers (the Pi 4's
plain-NEON figures against the Pi 4's ~12.8 GB/s).

    python benchmarks/inner_loops.py [--mca llvm-mca-19]   (apt-get install llvm-19)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_result  # noqa: E402

KERNELS = Path(__file__).resolve().parent.parent / "tpi" / "kernels"


@dataclass(frozen=True)
class Board:
    name: str
    ghz: float
    cores: int
    memory_gb_per_s: float  # theoretical: transfers/s x bus bytes


PI5 = Board("Raspberry Pi 5", 2.4, 4, 17.1)  # BCM2712, LPDDR4X-4267, 32 bits
PI4 = Board("Raspberry Pi 4", 1.8, 4, 12.8)  # BCM2711 (rev 1.4+), LPDDR4-3200, 32 bits


@dataclass(frozen=True)
class Case:
    name: str
    source: str
    cc: str
    march: str
    triple: str
    mcpu: str
    needs: dict[str, int]  # mnemonic prefix -> count the loop holds (which loop it is)
    bytes_per_iteration: int  # weight bytes one iteration consumes
    weights_per_iteration: int
    board: Board | None = None


ARM = ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu")
CASES = (
    Case(
        "int8, AArch64 dot products (Pi 5)",
        "small_matmul.c",
        ARM[0],
        "-march=armv8.2-a+dotprod",
        ARM[1],
        "neoverse-n1",
        {"sdot": 8},
        64,
        64,
        PI5,
    ),
    Case(
        "int8, AArch64 plain NEON (Pi 4)",
        "small_matmul.c",
        ARM[0],
        "-march=armv8-a",
        ARM[1],
        "cortex-a57",
        {"scvtf": 16, "fmla": 16},
        64,
        64,
        PI4,
    ),
    Case(
        "int4, AArch64 dot products (Pi 5)",
        "int4_matmul.c",
        ARM[0],
        "-march=armv8.2-a+dotprod",
        ARM[1],
        "neoverse-n1",
        {"sdot": 16},
        64,
        128,
        PI5,
    ),
    Case(
        "int4, AArch64 plain NEON (Pi 4)",
        "int4_matmul.c",
        ARM[0],
        "-march=armv8-a",
        ARM[1],
        "cortex-a57",
        {"ucvtf": 32, "fmla": 32},
        64,
        128,
        PI4,
    ),
    Case(
        "int8, x86 AVX-512 BF16 (this machine)",
        "small_matmul.c",
        "gcc",
        "-march=native",
        "x86_64-linux-gnu",
        "znver4",
        {"vdpbf16ps": 4},
        128,
        128,
    ),
    Case(
        "int8, x86 AVX2 (a laptop)",
        "small_matmul.c",
        "gcc",
        "-march=alderlake",
        "x86_64-linux-gnu",
        "alderlake",
        {"vcvtdq2ps": 8, "vfmadd": 8},
        64,
        64,
    ),
    Case(
        "int4, x86 AVX-512 BF16/VBMI (this machine)",
        "int4_matmul.c",
        "gcc",
        "-march=native",
        "x86_64-linux-gnu",
        "znver4",
        {"vpermb": 4},
        64,
        128,
    ),
)

BRANCH = re.compile(r"^\s+(?:b\.?\w*|cbnz|cbz|tbnz|tbz|j\w+)\s+(?:\w+,\s*)*(\.L\w+)")
LABEL = re.compile(r"^(\.L\w+):")


def assembly(case: Case, out: Path) -> list[str]:
    subprocess.run(
        [
            case.cc,
            "-O3",
            case.march,
            "-fopenmp",
            "-fPIC",
            "-S",
            str(KERNELS / case.source),
            "-o",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    return out.read_text().splitlines()


def mnemonic(line: str) -> str | None:
    s = line.strip()
    if not s or s.startswith((".", "#", "//", "@")) or s.endswith(":"):
        return None
    return s.split()[0]


def find_loop(lines: list[str], needs: dict[str, int]) -> list[str]:
    """The smallest loop (label ... backward branch to it) holding exactly `needs`."""
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := LABEL.match(line))}
    best: list[str] | None = None
    for i, line in enumerate(lines):
        m = BRANCH.match(line)
        if not m or labels.get(m.group(1), i + 1) > i:
            continue
        body = [x for x in lines[labels[m.group(1)] + 1 : i + 1] if mnemonic(x)]
        names = [mnemonic(x) for x in body]
        counts = {k: sum(1 for n in names if n.startswith(k)) for k in needs}
        if counts == needs and (best is None or len(body) < len(best)):
            best = body
    if best is None:
        raise click.ClickException(f"no loop with {needs} in the assembly")
    return best


def mca(mca_bin: str, case: Case, body: list[str]) -> dict:
    text = subprocess.run(
        [mca_bin, f"-mtriple={case.triple}", f"-mcpu={case.mcpu}", "-iterations=1000"],
        input="\n".join(body) + "\n",
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    field = {
        k: float(v)
        for k, v in re.findall(
            r"^(Iterations|Instructions|Total Cycles|Block RThroughput):\s+([\d.]+)", text, re.M
        )
    }
    return {
        "instructions": field["Instructions"] / field["Iterations"],
        "cycles": field["Total Cycles"] / field["Iterations"],
        "block_rthroughput": field["Block RThroughput"],
    }


@click.command()
@click.option(
    "--mca", "mca_bin", default=None, help="llvm-mca to use (default: llvm-mca-19, else llvm-mca)"
)
def main(mca_bin: str | None) -> None:
    mca_bin = mca_bin or shutil.which("llvm-mca-19") or shutil.which("llvm-mca")
    if not mca_bin:
        raise click.ClickException("no llvm-mca (apt-get install llvm-19)")
    said = subprocess.run([mca_bin, "--version"], capture_output=True, text=True).stdout
    version = next((x.strip() for x in said.splitlines() if "version" in x), mca_bin)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            if not shutil.which(case.cc):
                click.echo(f"skipped {case.name}: no {case.cc}")
                continue
            body = find_loop(assembly(case, Path(tmp) / "k.s"), case.needs)
            r = mca(mca_bin, case, body)
            per_cycle = case.bytes_per_iteration / r["cycles"]
            row = {
                "kernel": case.name,
                "march": case.march,
                "model": case.mcpu,
                "weights_per_iteration": case.weights_per_iteration,
                "weight_bytes_per_iteration": case.bytes_per_iteration,
                "instructions_per_iteration": round(r["instructions"], 2),
                "cycles_per_iteration": round(r["cycles"], 2),
                "block_rthroughput": r["block_rthroughput"],
                "instructions_per_weight": round(r["instructions"] / case.weights_per_iteration, 3),
                "weight_bytes_per_cycle": round(per_cycle, 2),
            }
            if (board := case.board) is not None:
                gbps = per_cycle * board.ghz * board.cores
                row["board"] = board.name
                row["all_cores_gb_per_s"] = round(gbps, 1)
                row["share_of_memory_bandwidth"] = round(gbps / board.memory_gb_per_s, 2)
            rows.append(row)
            line = f"{case.name:44s} {r['instructions']:5.1f} instr {r['cycles']:6.2f} cycles / {case.bytes_per_iteration:3d} B: {per_cycle:5.2f} B/cycle"
            if board is not None:
                line += (
                    f"; {board.cores} cores at {board.ghz} GHz: {row['all_cores_gb_per_s']} GB/s, "
                    f"{row['share_of_memory_bandwidth']:.1f}x the {board.name}'s {board.memory_gb_per_s} GB/s"
                )
            click.echo(line)
    write_result(
        "inner_loops",
        {
            "tool": version,
            "boards": [b.__dict__ for b in (PI5, PI4)],
            "loops": rows,
        },
    )


if __name__ == "__main__":
    main()
