"""The direct-to-split writer (tpi.storage.direct_split) against `tpi split`.

A synthetic int4 model (tpi.sources.synthetic) is written twice: directly, slice
by slice, and as a Hugging Face checkpoint (4-bit weights kept as integers, as
`tpi convert-gguf --keep-quant` stores them; vocabulary tables as the floats the
int8 rows stand for) that `tpi split --quant int4` then cuts. Both must give the
same files, byte for byte, listed alike, verifying and loading alike, at every
world size: so the direct splits of different world sizes hold one model.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tests.factories import make_tokenizer
from tpi.errors import ModelError
from tpi.model.config import parse_config
from tpi.model.partition import plan_partition
from tpi.model.pipeline_plan import plan_pipeline
from tpi.model.weights import EMBED, LM_HEAD, hf_layer_name
from tpi.quant.quantize import QuantSpec
from tpi.sources.synthetic import LAYOUT, SyntheticInt4Model
from tpi.storage.direct_split import remove_split, write_split
from tpi.storage.manifest import HEAD_FILE, read_manifest, verify_files
from tpi.storage.shard_reader import RankShard
from tpi.storage.split import read_split_index, split_model
from tpi.storage.tensor_file import write_safetensors

HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 320,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
QUANT = QuantSpec("int4", 32, LAYOUT.name)
PROJECTIONS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def write_checkpoint(model: SyntheticInt4Model, out) -> None:
    """The same weights as a Hugging Face checkpoint (fp32 floats, kept 4-bit integers)."""
    cfg = model.cfg
    tensors: dict[str, torch.Tensor] = {}
    for i in range(cfg.num_layers):
        for short, hf in PROJECTIONS.items():
            tensors.update(model.full_int4(i, short).stored(hf_layer_name(i, hf + ".weight")))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[hf_layer_name(i, norm + ".weight")] = torch.ones(cfg.hidden_size)
    for table, hf in ((EMBED, "model.embed_tokens.weight"), (LM_HEAD, "lm_head.weight")):
        q, scale = model.table_int8(table, 0, cfg.vocab_size)
        tensors[hf] = q.float() * scale.float()[:, None]  # exact in fp32
    tensors["model.norm.weight"] = torch.ones(cfg.hidden_size)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", tensors)
    (out / "config.json").write_text(json.dumps(HF_CONFIG))
    make_tokenizer(out, HF_CONFIG["vocab_size"])


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    model = SyntheticInt4Model(parse_config(HF_CONFIG), seed=7)
    ckpt = tmp_path_factory.mktemp("synthetic") / "hf"
    write_checkpoint(model, ckpt)
    return model, ckpt


def _card(tmp_path, config: dict):
    """A model card (config.json, tokenizer) for a directly written split."""
    card = tmp_path / "card"
    card.mkdir()
    (card / "config.json").write_text(json.dumps(config))
    make_tokenizer(card, config["vocab_size"])
    return card


def _write(model, partition, out, card, quant, model_id="synthetic", progress=None):
    return write_split(
        out,
        model.cfg,
        partition,
        model.layer,
        model.head,
        model_id=model_id,
        dtype=torch.float32,
        quant=quant,
        master_dir=card,
        progress=progress,
    )


def _direct(model, ckpt, out, shares, vocab_parallel=False, progress=None, stages=None):
    if stages is not None:
        partition = plan_pipeline(model.cfg, stages, shares=shares)
    else:
        partition = plan_partition(model.cfg, shares, vocab_parallel)
    return _write(model, partition, out, ckpt, QUANT, "synthetic-7", progress)


@pytest.mark.parametrize(
    "shares,vocab_parallel,stages",
    [
        ([1.0], False, None),
        ([1.0, 1.0], False, None),
        ([1.0] * 4, False, None),
        ([1.0, 1.0], True, None),
        ([1.0] * 3, False, [2, 1]),
    ],
    ids=["world1", "world2", "world4", "world2-vocab-parallel", "pipeline-2x1"],
)
def test_direct_split_equals_tpi_split_of_the_same_weights(
    synthetic, tmp_path, shares, vocab_parallel, stages
):
    model, ckpt = synthetic
    ours = _direct(model, ckpt, tmp_path / "direct", shares, vocab_parallel, stages=stages)
    theirs = split_model(
        ckpt,
        tmp_path / "split",
        shares,
        quant=QUANT,
        vocab_parallel=vocab_parallel,
        stage_sizes=stages,
    )
    a, b = read_split_index(ours), read_split_index(theirs)
    keys = ("format", "format_version", "world", "shares", "dtype", "quant", "vocab_parallel")
    for key in (*keys, "stages"):
        assert a.get(key) == b.get(key), key
    for r in range(len(shares)):
        m_ours, _ = read_manifest(ours / f"rank{r}")
        m_theirs, _ = read_manifest(theirs / f"rank{r}")
        # The same files with the same sha256, size and crc32; only the model's id differs.
        assert m_ours.files == m_theirs.files
        assert dataclasses.replace(m_theirs, model_id=m_ours.model_id) == m_ours
        verify_files(ours / f"rank{r}", m_ours)
        s_ours, s_theirs = RankShard(ours / f"rank{r}"), RankShard(theirs / f"rank{r}")
        for i in range(s_ours.config.num_layers):  # a stage's rank: its layers only
            x, y = s_ours.load_layer(i, torch.float32), s_theirs.load_layer(i, torch.float32)
            for field in dataclasses.fields(x):
                _assert_same(getattr(x, field.name), getattr(y, field.name))
        assert s_ours.has_head == s_theirs.has_head == (r == 0 or vocab_parallel)
        if s_ours.has_head:
            x, y = s_ours.load_head(torch.float32), s_theirs.load_head(torch.float32)
            _assert_same(x.embed, y.embed)
            _assert_same(x.lm_head, y.lm_head)
            assert x.start == y.start
    assert (ours / "rank0" / "tokenizer.json").is_file()
    assert HEAD_FILE in read_manifest(ours / "rank0")[0].files


def _assert_same(x, y) -> None:
    if x is None or isinstance(x, torch.Tensor):
        assert (x is None and y is None) or (x.dtype == y.dtype and torch.equal(x, y))
        return
    for f in dataclasses.fields(x):
        _assert_same(getattr(x, f.name), getattr(y, f.name))


def test_an_interrupted_direct_split_resumes_where_it_stopped(synthetic, tmp_path):
    model, ckpt = synthetic
    whole = _direct(model, ckpt, tmp_path / "whole", [1.0, 1.0])
    seen = []

    def stop_after_first_layer(done, total, item):
        seen.append(item)
        if done == 1:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _direct(model, ckpt, out, [1.0, 1.0], progress=stop_after_first_layer)
    assert not out.exists() and seen == ["layer 0"]
    seen.clear()
    _direct(model, ckpt, out, [1.0, 1.0], progress=lambda d, t, item: seen.append(item))
    assert seen == ["layer 1", "head"]  # layer 0 was not written again
    for r in range(2):
        assert (
            read_manifest(out / f"rank{r}")[0].files == read_manifest(whole / f"rank{r}")[0].files
        )
    # Done once: asking again returns the split untouched.
    assert _direct(model, ckpt, out, [1.0, 1.0], progress=lambda *a: seen.append(a)) == out
    assert seen == ["layer 1", "head"]
    remove_split(out)
    assert not out.exists()


def test_cuts_off_the_weight_blocks_are_refused(tmp_path):
    # 192 MLP columns across 4 ranks are cut in blocks of 32: not whole 64-column blocks.
    model = SyntheticInt4Model(parse_config({**HF_CONFIG, "intermediate_size": 192}))
    with pytest.raises(ModelError, match="blocks of 64"):
        write_split(
            tmp_path / "odd",
            model.cfg,
            plan_partition(model.cfg, [1.0] * 4),
            model.layer,
            model.head,
            model_id="odd",
            dtype=torch.float32,
            quant=QUANT,
        )


MOE_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "hidden_size": 192,
    "intermediate_size": 256,
    "moe_intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 3,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "num_experts": 6,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "vocab_size": 320,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


def test_a_synthetic_mixture_of_experts_is_one_model_at_every_world(tmp_path):
    """A Qwen3-MoE-shaped synthetic split: router on every rank, each rank's columns of
    every expert equal to the world-1 expert's rows and columns, experts in their own
    file; it runs, and streamed with a window of one gives the resident logits."""
    from tpi.master.loader import MemoryOptions, load_rank0
    from tpi.model.weights import expert_name
    from tpi.storage.expert_file import experts_file

    cfg = parse_config(MOE_CONFIG)
    model = SyntheticInt4Model(cfg, seed=3)
    card = _card(tmp_path, MOE_CONFIG)

    def split(shares, name):
        return _write(model, plan_partition(cfg, shares), tmp_path / name, card, QUANT)

    one, three = split([1.0], "w1"), split([1.0] * 3, "w3")
    whole = RankShard(one / "rank0")._load(experts_file(0), torch.float32)
    for r in range(3):
        shard = RankShard(three / f"rank{r}")
        c0, c1 = shard.rank_slice.expert_cols
        assert (c0, c1) == (64 * r, 64 * (r + 1))
        part = shard._load(experts_file(0), torch.float32)
        for e in range(cfg.num_experts):
            gate_up = whole[expert_name(e, "gate_up.q4")]
            rows = torch.cat([gate_up[c0:c1], gate_up[192 + c0 : 192 + c1]])
            assert torch.equal(part[expert_name(e, "gate_up.q4")], rows)
    logits = []
    for window in (None, 1):
        engine, runtime = load_rank0(
            one / "rank0", torch.float32, None, MemoryOptions(window=window), lambda _m: None
        )
        logits.append(engine.forward(list(range(3, 19)), 0, all_logits=True))
        runtime.close()
    assert torch.isfinite(logits[0]).all() and logits[0].std() > 0.1
    assert torch.equal(logits[0], logits[1])


def _dense(w) -> torch.Tensor:
    """An int8 matrix as the floats it stands for."""
    return w.q.float() * w.scale.float()[:, None]


def test_a_synthetic_int8_model_is_one_model_at_every_world(tmp_path):
    """The int8 synthetic source (per-row int8, as `tpi split --quant int8` stores
    it): each rank's rows of q/k/v and gate/up and columns of o and down, as the
    floats they stand for, are exactly the world-1 matrices' slices, at world 2 and
    for a pipeline's stage; the world-1 model runs with well-spread logits."""
    from tpi.master.loader import MemoryOptions, load_rank0
    from tpi.quant.formats import Int8Weight
    from tpi.sources.synthetic import SyntheticInt8Model

    model = SyntheticInt8Model(parse_config(HF_CONFIG), seed=5)
    cfg = model.cfg
    card = _card(tmp_path, HF_CONFIG)

    def split(partition, name):
        return _write(model, partition, tmp_path / name, card, QuantSpec("int8"))

    one = split(plan_partition(cfg, [1.0]), "w1")
    two = split(plan_partition(cfg, [1.0, 1.0]), "w2")
    piped = split(plan_pipeline(cfg, [1, 1], shares=[1.0, 1.0]), "pp2")
    assert read_split_index(one)["quant"]["mode"] == "int8"
    whole = [RankShard(one / "rank0").load_layer(i, torch.float32) for i in range(2)]
    assert isinstance(whole[0].qkv, Int8Weight) and isinstance(whole[0].down, Int8Weight)
    hd = cfg.head_dim
    for r in range(2):
        shard = RankShard(two / f"rank{r}")
        rs = shard.rank_slice
        for i in range(2):
            part, full = shard.load_layer(i, torch.float32), whole[i]
            q0, q1 = (h * hd for h in rs.q_heads)
            k0, k1 = (h * hd for h in rs.kv_heads)
            qkv = _dense(full.qkv)
            kv = cfg.num_heads * hd
            n_kv = cfg.num_kv_heads * hd
            rows = torch.cat(
                [qkv[q0:q1], qkv[kv + k0 : kv + k1], qkv[kv + n_kv + k0 : kv + n_kv + k1]]
            )
            assert torch.equal(_dense(part.qkv), rows)
            assert torch.equal(_dense(part.o), _dense(full.o)[:, q0:q1])
            m0, m1 = rs.mlp
            gu, inter = _dense(full.gate_up), cfg.intermediate_size
            assert torch.equal(
                _dense(part.gate_up), torch.cat([gu[m0:m1], gu[inter + m0 : inter + m1]])
            )
            assert torch.equal(_dense(part.down), _dense(full.down)[:, m0:m1])
    # A stage's rank holds its layer whole: the world-1 model's second layer.
    last = RankShard(piped / "rank1").load_layer(0, torch.float32)
    assert torch.equal(_dense(last.qkv), _dense(whole[1].qkv))
    for name in ("o", "gate_up", "down"):
        assert torch.equal(_dense(getattr(last, name)), _dense(getattr(whole[1], name)))
    engine, runtime = load_rank0(
        one / "rank0", torch.float32, None, MemoryOptions(), lambda _m: None
    )
    logits = engine.forward(list(range(3, 19)), 0, all_logits=True)
    runtime.close()
    assert torch.isfinite(logits).all() and logits.std() > 0.1
