"""GGUF conversion: a synthetic file written the way llama.cpp writes it, and the
embedded SmolLM2 against transformers (on our checkpoint and on the GGUF itself)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.factories import load_reference, make_model
from tests.gguf_writer import write_gguf
from tests.stepping import greedy
from tpi.errors import ModelError, UnsupportedModelError
from tpi.master.engine import load_engine
from tpi.sources.gguf_convert import convert_gguf
from tpi.storage.checkpoint import Checkpoint
from tpi.text.tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn")
    hf = make_model(d / "hf", "llama", tied=False, heads=8, kv_heads=2)
    path = d / "model.gguf"
    write_gguf(hf, path)
    return hf, path


def test_synthetic_gguf_round_trips_exactly(synthetic, tmp_path):
    hf, path = synthetic
    out = convert_gguf(path, tmp_path / "conv")
    a, b = Checkpoint(hf), Checkpoint(out)
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        assert torch.equal(a.get(name, torch.float32), b.get(name)), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 2 and cfg["tie_word_embeddings"] is False
    ours, orig = TextTokenizer(out), TextTokenizer(hf)
    for s in ("Hello world", "naïve café 日本語 🙂", "<|im_start|>user\nhi"):
        assert ours.encode(s) == orig.encode(s)
    msgs = [{"role": "user", "content": "hi"}]
    assert ours.render_chat(msgs) == orig.render_chat(msgs)


def test_quantized_gguf_converts_to_transformers_equivalent(synthetic, tmp_path):
    """Q8_0 blocks: our dequantized checkpoint equals what transformers' GGUF loader builds."""
    hf, _ = synthetic
    path = tmp_path / "q8.gguf"
    write_gguf(hf, path, quant="Q8_0")
    out = convert_gguf(path, tmp_path / "conv")
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="q8.gguf", dtype=torch.float32
    )
    state = ref.state_dict()
    ck = Checkpoint(out)
    for name in ck.names():
        assert torch.equal(ck.get(name), state[name]), name


def test_refuses_existing_output_and_bad_files(synthetic, tmp_path):
    _, path = synthetic
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ModelError, match="not empty"):
        convert_gguf(path, out)
    assert (out / "keep.txt").read_text() == "x"
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ModelError, match="not a readable GGUF"):
        convert_gguf(junk, tmp_path / "o2")
    assert not (tmp_path / "o2").exists()


def test_sentencepiece_vocab_is_refused_clearly():
    from tpi.sources.gguf_tokenizer import build_tokenizer

    with pytest.raises(UnsupportedModelError, match="only byte-level BPE"):
        build_tokenizer({"model": "llama", "tokens": ["a"]})


# --- the embedded SmolLM2 -------------------------------------------------------------

CHAT = [{"role": "user", "content": "Write a long story about a dragon who learns to code."}]


def _greedy_hf(model, prompt: list[int], steps: int) -> list[int]:
    out = []
    with torch.no_grad():
        res = model(torch.tensor([prompt]), use_cache=True)
        cache = res.past_key_values
        for _ in range(steps):
            t = int(res.logits[0, -1].argmax())
            out.append(t)
            res = model(torch.tensor([[t]]), past_key_values=cache, use_cache=True)
            cache = res.past_key_values
    return out


def test_smollm_config_matches_the_published_architecture(smollm_dir):
    cfg = json.loads((smollm_dir / "config.json").read_text())
    assert (
        cfg["num_hidden_layers"],
        cfg["hidden_size"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
    ) == (30, 576, 9, 3)
    assert cfg["tie_word_embeddings"] is True


def test_smollm_greedy_matches_transformers_on_our_checkpoint(smollm_dir):
    tok = TextTokenizer(smollm_dir)
    prompt = tok.encode_chat(CHAT)
    ref = load_reference(smollm_dir)
    assert greedy(load_engine(smollm_dir), prompt, 32) == _greedy_hf(ref, prompt, 32)


def test_smollm_matches_transformers_own_gguf_loader(smollm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tpi.sources.default_model import GGUF_NAME, find_embedded_gguf

    folder = str(find_embedded_gguf().parent)
    ref_tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    tok = TextTokenizer(smollm_dir)
    for s in (
        "Hello world",
        " Hello",
        "What is the capital of France?",
        "naïve café 日本語 🙂",
        "  two  spaces\n\ttab",
        "x = 12345",
    ):
        assert tok.encode(s) == ref_tok.encode(s), s
    prompt = tok.encode_chat(CHAT)
    ref_ids = ref_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    assert prompt == list(ref_ids["input_ids"] if hasattr(ref_ids, "keys") else ref_ids)
    ref = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF_NAME, dtype=torch.float32
    ).eval()
    assert greedy(load_engine(smollm_dir), prompt, 32) == _greedy_hf(ref, prompt, 32)


@pytest.mark.parametrize("quant", ["Q4_0", "Q4_1"])
def test_keep_quant_stores_4bit_weights_that_read_back_identical(synthetic, tmp_path, quant):
    hf, _ = synthetic
    path = tmp_path / f"{quant}.gguf"
    write_gguf(hf, path, quant=quant)
    plain = convert_gguf(path, tmp_path / "plain")
    kept = convert_gguf(path, tmp_path / "kept", keep_quant=True)
    a, b = Checkpoint(plain), Checkpoint(kept)
    stored = [n for n in b.names() if n.endswith(".int4")]
    assert len(stored) == 7 * 3  # every matmul weight of every layer
    for name in a.names():
        assert torch.equal(a.get(name), b.get(name)), name  # dequantized exactly as gguf does
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    assert size(kept) < 0.6 * size(plain)  # fp32 embedding/head/norms stay as they were
    assert torch.equal(
        load_engine(kept).forward([5, 6, 7], 0), load_engine(plain).forward([5, 6, 7], 0)
    )


def test_int4_split_takes_the_kept_integers_as_they_are(synthetic, tmp_path):
    from tpi.quant.int4_pack import Int4Layout, unpack
    from tpi.quant.quantize import QuantSpec
    from tpi.storage.manifest import read_manifest
    from tpi.storage.split import split_model
    from tpi.storage.tensor_file import SafetensorsFile

    hf, _ = synthetic
    path = tmp_path / "q41.gguf"
    write_gguf(hf, path, quant="Q4_1")
    kept = convert_gguf(path, tmp_path / "kept", keep_quant=True)
    split = split_model(kept, tmp_path / "s", [1.0, 1.0], quant=QuantSpec.for_split("int4", 32))
    ck = Checkpoint(kept)
    for rank in (0, 1):
        m, _ = read_manifest(split / f"rank{rank}")
        lo, hi = m.rank_slice.mlp
        packed = SafetensorsFile(split / f"rank{rank}" / "layer_001.safetensors").read("gate_up.q4")
        got = unpack(packed, Int4Layout.parse(m.quant.int4_layout))
        gate = ck.get_int4("model.layers.1.mlp.gate_proj.weight").q[lo:hi]
        up = ck.get_int4("model.layers.1.mlp.up_proj.weight").q[lo:hi]
        assert torch.equal(got, torch.cat([gate, up]))


def test_smollm_kept_int4_split_tracks_fp32(smollm_dir, tmp_path):
    """The embedded Q4_1 weights, kept and passed into an int4 split: only the bf16
    rounding of their scales separates them from the fp32 conversion."""
    import torch.nn.functional as F

    from tests.stepping import step_logits
    from tpi.master.loader import MemoryOptions, load_rank0
    from tpi.quant.quantize import QuantSpec
    from tpi.sources.default_model import find_embedded_gguf
    from tpi.storage.split import split_model

    kept = convert_gguf(find_embedded_gguf(), tmp_path / "kept", keep_quant=True)
    split = split_model(kept, tmp_path / "s", [1.0], quant=QuantSpec.for_split("int4", 32))
    tok = TextTokenizer(smollm_dir)
    prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    ref = load_engine(smollm_dir)
    follow = greedy(ref, prompt, 32)
    ref.reset()
    want = step_logits(ref, prompt, follow[:-1])
    engine, runtime = load_rank0(
        split / "rank0", torch.float32, None, MemoryOptions(), lambda _m: None
    )
    got = step_logits(engine, prompt, follow[:-1])
    runtime.close()
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) >= 0.9995
    # The int8 head gives bf16-precision logits: exact ties between two tokens
    # happen, and either is the int4 model's choice (argmax takes the lower id).
    chosen = got.gather(1, torch.tensor(follow)[:, None])[:, 0]
    assert int((chosen == got.max(-1).values).sum()) >= 31
