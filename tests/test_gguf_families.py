"""GGUF conversion of the newer families: Qwen3 and Qwen3-MoE (byte-level BPE, as
llama.cpp writes them: q/k norms, stacked experts) convert exactly; the families
whose SentencePiece vocabulary GGUF cannot give back exactly are refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.gguf_writer import write_gguf
from tests.stepping import step_logits
from tpi.errors import UnsupportedModelError
from tpi.master.engine import load_engine
from tpi.model.config import load_config
from tpi.sources.gguf_convert import convert_gguf
from tpi.storage.checkpoint import Checkpoint
from tpi.text.tokenizer import TextTokenizer


@pytest.mark.parametrize(
    ("fixture", "arch"), [("qwen3_dir", "qwen3"), ("qwen3_moe_dir", "qwen3moe")]
)
def test_qwen3_and_qwen3_moe_gguf_convert_exactly(fixture, arch, request, tmp_path):
    hf = request.getfixturevalue(fixture)
    path = tmp_path / "m.gguf"
    write_gguf(hf, path, arch)
    out = convert_gguf(path, tmp_path / "conv")
    a, b = Checkpoint(hf), Checkpoint(out)
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        assert torch.equal(a.get(name, torch.float32), b.get(name)), name
    ours, theirs = load_config(out), load_config(hf)
    for field in ("num_experts", "experts_per_token", "moe_intermediate_size", "norm_topk_prob",
                  "moe_layers", "qk_norm", "head_dim", "num_kv_heads", "tie_word_embeddings"):  # fmt: skip
        assert getattr(ours, field) == getattr(theirs, field), field
    for s in ("Hello world", "naïve café 日本語 🙂", "<|im_start|>user\nhi"):
        assert TextTokenizer(out).encode(s) == TextTokenizer(hf).encode(s)
    prompt, follow = list(range(5, 25)), list(range(40, 48))
    want = step_logits(load_engine(hf), prompt, follow)
    assert torch.equal(step_logits(load_engine(out), prompt, follow), want)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "phi3"])
def test_sentencepiece_families_are_refused_in_one_line(arch, tmp_path):
    import gguf

    path = tmp_path / f"{arch}.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(
        UnsupportedModelError, match=rf"GGUF architecture '{arch}' is not converted"
    ):
        convert_gguf(path, tmp_path / "o")
    assert not (tmp_path / "o").exists()
