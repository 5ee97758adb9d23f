"""benchmarks/vs_llamacpp.py without timing anything: parsing of recorded `llama-bench -o
json` and `tpi bench` outputs, medians, ratios, the docs/performance.md table and the
targets, and the GGUF writer the 7B comparison relies on (read back through tpi's own
converter)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from benchmarks.hf_to_gguf import Vocab, permute_rotary, truncate_vocab, vocab_from_gguf, write_gguf
from benchmarks.vs_llamacpp import (
    BenchError,
    LlamaCpp,
    acceptance,
    llama_sample,
    main,
    parse_llama_bench,
    summarize,
    table,
    tpi_sample,
)
from tpi.sources.default_model import find_embedded_gguf
from tpi.sources.gguf_convert import convert_gguf, unpermute_rotary

DATA = Path(__file__).parent / "data" / "vs_llamacpp"


def _recorded() -> tuple[dict, dict]:
    """The recorded SmolLM2 Q4_1 / int4 runs at 2 threads (128-token prompt, 64 new)."""
    pp = parse_llama_bench((DATA / "llama_bench_pp.json").read_text())
    tg = parse_llama_bench((DATA / "llama_bench_tg.json").read_text())
    return llama_sample(pp, tg), tpi_sample(json.loads((DATA / "tpi_bench.json").read_text()))


def test_llama_bench_json_gives_prefill_at_depth_0_and_decode_after_the_prompt():
    raw_pp = json.loads((DATA / "llama_bench_pp.json").read_text())[0]
    raw_tg = json.loads((DATA / "llama_bench_tg.json").read_text())[0]
    pp = parse_llama_bench(
        "log line before the JSON\n" + (DATA / "llama_bench_pp.json").read_text()
    )
    tg = parse_llama_bench((DATA / "llama_bench_tg.json").read_text())
    assert (pp["n_prompt"], pp["n_gen"], pp["n_depth"]) == (128, 0, 0)
    assert (tg["n_prompt"], tg["n_gen"], tg["n_depth"]) == (0, 64, 128)
    sample = llama_sample(pp, tg)
    assert sample["prefill_tokens_per_s"] == pytest.approx(128 / (raw_pp["avg_ns"] / 1e9))
    assert sample["decode_ms_per_token"] == pytest.approx(raw_tg["avg_ns"] / 1e6 / 64)
    assert pp["model_type"].endswith("Q4_1")
    with pytest.raises(ValueError):  # the tests swapped: decode is not a prefill
        llama_sample(tg, pp)
    with pytest.raises(ValueError):  # several tests in one output are not what we run
        parse_llama_bench(json.dumps([raw_pp, raw_tg]))


def test_tpi_bench_report_gives_prefill_from_ttft():
    report = json.loads((DATA / "tpi_bench.json").read_text())
    sample = tpi_sample(report)
    assert sample["prefill_tokens_per_s"] == pytest.approx(128 / (report["ttft_ms"] / 1000))
    assert sample["decode_ms_per_token"] == report["decode_ms_per_token"]


def test_medians_ratios_table_and_targets():
    llama, tpi = _recorded()

    def scaled(s: dict, decode: float, prefill: float) -> dict:
        return {
            "decode_ms_per_token": s["decode_ms_per_token"] * decode,
            "prefill_tokens_per_s": s["prefill_tokens_per_s"] * prefill,
        }

    samples = {
        # 2 threads: tpi's runs 3x, 1x and 0.5x its recorded time -> median = recorded.
        "smollm2/int4/t2": {
            "tpi": [scaled(tpi, k, 1 / k) for k in (3, 1, 0.5)],
            "llama.cpp": [llama, scaled(llama, 1.1, 1), scaled(llama, 0.9, 1)],
        },
        # 1 thread: both twice as slow.
        "smollm2/int4/t1": {
            "tpi": [scaled(tpi, 2, 0.5)],
            "llama.cpp": [scaled(llama, 2, 0.5)],
        },
        "7b/int8/t2": {"tpi": [scaled(llama, 1.1, 2)], "llama.cpp": [llama]},
    }
    rows = summarize(samples, {"smollm2/int4/t2": "llama 256M Q4_1"})
    assert [(r["model"], r["format"], r["threads"]) for r in rows] == [
        ("smollm2", "int4", 1),
        ("smollm2", "int4", 2),
        ("7b", "int8", 2),
    ]
    two = rows[1]
    assert two["tpi_decode_ms"] == round(tpi["decode_ms_per_token"], 2)
    assert two["llama_decode_ms"] == round(llama["decode_ms_per_token"], 2)
    assert two["decode_ratio"] == pytest.approx(
        tpi["decode_ms_per_token"] / llama["decode_ms_per_token"], rel=1e-3
    )
    assert two["tpi_speedup_2_over_1"] == pytest.approx(2.0, rel=1e-3)
    assert two["llama_speedup_2_over_1"] == pytest.approx(2.0, rel=1e-3)
    assert two["llama_format"] == "Q4_1" and two["llama_model_type"] == "llama 256M Q4_1"
    assert rows[2]["decode_ratio"] == pytest.approx(1.1, rel=1e-3)

    md = table(rows).splitlines()
    assert len(md) == 2 + 3
    assert md[3].startswith("| SmolLM2-135M | int4 / Q4_1 | 2 |")
    assert "2.00x / 2.00x" in md[3]
    assert md[4].startswith("| 7B-shaped | int8 / Q8_0 | 2 | ")

    got = acceptance(rows)
    recorded_ok = two["decode_ratio"] <= 1.2
    assert got["tpi_decode_within_1.2x_of_llama_cpp_at_2_threads"] == {
        "smollm2 int4": recorded_ok,
        "7b int8": True,
    }
    assert got["tpi_2_threads_faster_than_1"] == {"smollm2 int4": True}
    assert got["tpi_prefill_no_slower_than_llama_cpp"]["7b int8 2t"] is True
    assert got["all_met"] is False or recorded_ok


def test_missing_llama_cpp_says_how_to_build_it(tmp_path):
    with pytest.raises(BenchError, match="llama-bench.*docs/performance.md"):
        LlamaCpp.find(tmp_path)
    r = CliRunner().invoke(main, ["--work", str(tmp_path / "w")], env={"LLAMA_CPP_BIN": None})
    assert r.exit_code != 0
    assert "llama.cpp not given" in r.output and "--llama-cpp" in r.output


def test_clean_removes_the_work_dir(tmp_path):
    work = tmp_path / "w"
    (work / "smollm2").mkdir(parents=True)
    (work / "smollm2" / "x.gguf").write_bytes(b"0" * 1000)
    r = CliRunner().invoke(main, ["--work", str(work), "--clean"])
    assert r.exit_code == 0, r.output
    assert not work.exists()


def test_truncated_vocab_keeps_only_merges_among_kept_tokens():
    v = Vocab(
        tokens=["<s>", "a", "b", "c", "ab", "abc", "bc"],
        types=[3, 1, 1, 1, 1, 1, 1],
        merges=["a b", "ab c", "b c"],
        pre="smollm",
        bos=0,
        eos=6,
        unk=0,
        pad=None,
    )
    t = truncate_vocab(v, 5)
    assert t.tokens == ["<s>", "a", "b", "c", "ab"] and t.types == [3, 1, 1, 1, 1]
    assert t.merges == ["a b"]
    assert (t.bos, t.eos) == (0, None)  # a special id past the cut is dropped, not dangling


def test_rotary_permutation_is_the_inverse_of_the_readers():
    for heads, rows, cols in ((8, 64, 24), (2, 16, 24)):
        w = torch.randn(rows, cols)
        assert torch.equal(
            torch.from_numpy(unpermute_rotary(permute_rotary(w, heads).numpy(), heads)), w
        )
        b = torch.randn(rows)
        assert torch.equal(
            torch.from_numpy(unpermute_rotary(permute_rotary(b, heads).numpy(), heads)), b
        )


def test_written_gguf_reads_back_as_the_same_checkpoint(llama_dir, tmp_path):
    """A Llama with grouped KV heads and its own LM head, written as GGUF and converted
    back by tpi: every tensor comes back where it was, rotary rows included."""
    smol = find_embedded_gguf()
    assert smol is not None, "the embedded SmolLM2 package is part of the dev install"
    cfg = json.loads((llama_dir / "config.json").read_text())
    gguf_path = write_gguf(
        llama_dir, tmp_path / "m.gguf", vocab_from_gguf(smol, cfg["vocab_size"]), "f32"
    )
    back = convert_gguf(gguf_path, tmp_path / "back")
    want, got = {}, {}
    for f in llama_dir.glob("*.safetensors"):
        want.update(load_file(f))
    for f in back.glob("*.safetensors"):
        got.update(load_file(f))
    assert set(got) == set(want)
    for name, t in want.items():
        assert torch.equal(got[name], t.float()), name
    back_cfg = json.loads((back / "config.json").read_text())
    for key in ("num_attention_heads", "num_key_value_heads", "hidden_size", "vocab_size"):
        assert back_cfg[key] == cfg[key]
    assert not back_cfg["tie_word_embeddings"]
