"""`tpi bench`: per-node JSON with bytes per token from RAM, from disk and on the wire."""

from __future__ import annotations

import json

from click.testing import CliRunner

from tpi.cli import cli
from tpi.storage.manifest import read_manifest
from tpi.storage.split import split_model


def _bench(args: list[str]) -> dict:
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    return json.loads(r.output[r.output.index("{") :])


def test_single_node_streaming_reports_ram_and_disk_bytes(llama_dir, tmp_path):
    split = split_model(llama_dir, tmp_path / "s", [1.0])
    m, _ = read_manifest(split / "rank0")
    layer_file_bytes = sum(v["bytes"] for k, v in m.files.items() if k.startswith("layer_"))
    report = _bench(
        [
            "bench",
            "--model",
            str(split),
            "--window",
            "1",
            "--prompt-tokens",
            "8",
            "--new-tokens",
            "4",
        ]
    )
    node = report["nodes"]["0"]
    per_token = node["decode"]["per_token"]
    # Window 1 of 3 layers: every layer is read from disk for every token (plus the
    # next token's first layer, prefetched before the measurement ends: 1/4 of one
    # pass of 3 layers over these 4 tokens).
    assert 0.9 * layer_file_bytes <= per_token["disk_bytes"] <= (1 + 1 / 12) * layer_file_bytes
    # From RAM: the layers as held (fp32 = as stored), the LM head and the KV cache.
    kv = node["decode"]["kv_bytes_per_position"] * (8 + 2.5)
    want = node["decode"]["weight_bytes_per_pass"] + node["decode"]["head_bytes"] + kv
    assert per_token["ram_bytes"] == int(want)
    assert per_token["wire_bytes"] == 0
    assert report["decode_ms_per_token"] > 0


def test_quantized_cluster_reports_smaller_ram_bytes_and_wire_bytes_per_node(llama_dir, tmp_path):
    args = ["--prompt-tokens", "8", "--new-tokens", "4", "--model", str(llama_dir)]
    plain = _bench(["cluster", "--workers", "2", "--dir", str(tmp_path / "c"), "bench", *args])
    int8 = _bench(
        ["cluster", "--workers", "2", "--dir", str(tmp_path / "c"), "bench", *args]
        + ["--quant", "int8", "--vocab-parallel"]
    )
    assert set(plain["nodes"]) == set(int8["nodes"]) == {"0", "1", "2"}
    for r in ("0", "1", "2"):
        a = plain["nodes"][r]["decode"]["per_token"]
        b = int8["nodes"][r]["decode"]["per_token"]
        assert a["wire_bytes"] > 0 and b["wire_bytes"] > 0
        assert b["ram_bytes"] < a["ram_bytes"]
    # The master's head shrank most: int8 and a third of the vocabulary.
    head_plain = plain["nodes"]["0"]["decode"]["head_bytes"]
    assert int8["nodes"]["0"]["decode"]["head_bytes"] < head_plain / 3
    # Every node's profile (tpi.planning), workers' asked for over their session.
    assert set(plain["profiles"]) == {"0", "1", "2"}
    for r in ("0", "1", "2"):
        assert plain["profiles"][r]["device"]["threads"] >= 1
