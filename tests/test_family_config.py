"""Reading the families' config.json (old and new transformers formats), their
manifests, how experts are partitioned, and the one-line refusal of the rest."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from tests.conftest import FAMILY_FIXTURES
from tpi.cli import cli
from tpi.errors import UnsupportedModelError
from tpi.model.config import ModelConfig, load_config, parse_config
from tpi.model.decoder import Decoder, LocalCollective
from tpi.model.layers import (
    SequenceStep,
    StepContext,
    attention_partial,
    mlp_partial,
    residual_add,
)
from tpi.model.partition import PartitionError, plan_partition
from tpi.runtime.resident_layers import ResidentLayers
from tpi.storage.checkpoint_rank import CheckpointRank

LLAMA_CONFIG_KEYS = {
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
    "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
    "rope", "tie_word_embeddings", "attention_bias", "o_proj_bias", "mlp_bias",
    "sliding_windows", "bos_token_id", "eos_token_ids",
}  # fmt: skip


def test_a_llama_manifest_config_is_unchanged_by_the_new_fields(llama_dir, llama3_dir):
    """Splits of the older families keep their manifests byte for byte (and so their
    hashes, and the shards cached on workers)."""
    for d in (llama_dir, llama3_dir):
        out = load_config(d).to_dict()
        assert set(out) == LLAMA_CONFIG_KEYS
        assert set(out["rope"]) == {
            "theta", "rope_type", "factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings",
        }  # fmt: skip


@pytest.mark.parametrize("fixture", FAMILY_FIXTURES)
def test_family_configs_round_trip_through_a_manifest(fixture, request):
    cfg = load_config(request.getfixturevalue(fixture))
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def _gemma3_new(**extra) -> dict:
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 7,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "vocab_size": 100,
        "sliding_window": 512,
        "query_pre_attn_scalar": 16,
        **extra,
    }


def test_gemma3_configs_before_and_after_transformers_5_read_alike():
    new = parse_config(
        _gemma3_new(
            layer_types=["sliding_attention"] * 5 + ["full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        )
    )
    old = parse_config(
        _gemma3_new(
            sliding_window_pattern=6,
            rope_theta=1e6,
            rope_local_base_freq=1e4,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
        )
    )
    assert new == old
    assert new.sliding_windows == (512,) * 5 + (None, 512)
    assert new.rope.theta == 1e6 and new.rope.factor == 8.0
    assert new.rope_local.theta == 1e4 and new.rope_local.rope_type == "default"
    assert new.norm_offset == 1.0 and new.embed_scale == 8.0 and new.attn_scale == 0.25
    assert new.qk_norm and new.sandwich_norms and new.tie_word_embeddings
    assert new.hidden_act == "gelu_tanh"


def test_phi3_su_and_longrope_read_alike_and_qwen3_moe_counts_experts_either_way():
    base = {
        "architectures": ["Phi3ForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 100,
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
    }
    factors = {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    su = parse_config({**base, "rope_scaling": {"type": "su", **factors}})
    longrope = parse_config({**base, "rope_scaling": {"rope_type": "longrope", **factors}})
    assert su == longrope and su.rope.rope_type == "longrope"
    # transformers' default attention factor: sqrt(1 + ln(32) / ln(4096)).
    assert su.rope.attention_factor == pytest.approx((1 + 3.4657359 / 8.3177662) ** 0.5)
    moe = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "vocab_size": 100,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [3],
    }
    a = parse_config({**moe, "num_experts": 8})
    b = parse_config({**moe, "num_local_experts": 8})
    assert a == b and a.num_experts == 8
    assert a.moe_layers == (False, True, False, False)


@pytest.mark.parametrize(
    "arch", ["DeepseekV3ForCausalLM", "Gemma3ForConditionalGeneration", "PhiForCausalLM"]
)
def test_unsupported_architectures_are_one_line_naming_them(arch, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": [arch], "hidden_size": 8}))
    with pytest.raises(UnsupportedModelError, match=f"unsupported architecture {arch} "):
        load_config(d)
    out = CliRunner().invoke(cli, ["generate", "--model", str(d), "hi"])
    assert out.exit_code == 1
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and arch in lines[0] and "Traceback" not in out.output


def test_unsupported_options_name_themselves():
    base = _gemma3_new(layer_types=["sliding_attention"] * 7)
    with pytest.raises(UnsupportedModelError, match="bidirectional"):
        parse_config({**base, "use_bidirectional_attention": True})
    with pytest.raises(UnsupportedModelError, match="activation 'relu'"):
        parse_config({**base, "hidden_activation": "relu"})
    with pytest.raises(UnsupportedModelError, match="rope scaling type 'yarn'"):
        parse_config(
            {**base, "architectures": ["Qwen3ForCausalLM"], "rope_scaling": {"rope_type": "yarn"}}
        )


# --- experts across ranks ------------------------------------------------------------------


@pytest.mark.parametrize("split", ["experts", "columns"])
@pytest.mark.parametrize("shares", [[1.0], [1.0, 1.0, 1.0], [2.0, 1.0, 1.0], [1.0, 3.0]])
def test_every_expert_column_is_held_once(qwen3_moe_dir, split, shares):
    cfg = load_config(qwen3_moe_dir)
    part = plan_partition(cfg, shares, moe_split=split)
    held = torch.zeros(cfg.num_experts, cfg.moe_intermediate_size, dtype=torch.int32)
    for s in part.slices:
        (e0, e1), (c0, c1) = s.experts, s.expert_cols
        assert e1 > e0 and c1 > c0
        held[e0:e1, c0:c1] += 1
    assert bool((held == 1).all())
    if split == "experts":  # whole experts, in proportion to the shares
        counts = [s.experts[1] - s.experts[0] for s in part.slices]
        assert sum(counts) == cfg.num_experts
        if shares == [2.0, 1.0, 1.0]:
            assert counts == [4, 2, 2]


def test_more_ranks_than_experts_split_columns(mixtral_dir):
    cfg = load_config(mixtral_dir)  # 6 experts
    part = plan_partition(cfg, [1.0] * 7)
    assert all(s.experts == (0, cfg.num_experts) for s in part.slices)
    with pytest.raises(PartitionError, match="unknown expert split"):
        plan_partition(cfg, [1.0], moe_split="rows")


def _lockstep(model_dir, shares: list[float], split: str = "experts") -> float:
    """Run each rank's slice and sum the partials layer by layer (what the allreduce
    does), against the single-node hidden states."""
    cfg = load_config(model_dir)
    part = plan_partition(cfg, shares, moe_split=split)

    def decoder(rs):
        layers = ResidentLayers(CheckpointRank(model_dir, rs).load_layers(torch.float32))
        return Decoder(cfg, rs, layers, LocalCollective())

    full = decoder(plan_partition(cfg, [1.0]).slices[0])
    ranks = [decoder(rs) for rs in part.slices]
    h = torch.randn(6, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    expected = full.forward(h, 0)
    x = h
    for i in range(cfg.num_layers):
        ws = [r.layers.layers[i] for r in ranks]
        window = cfg.sliding_windows[i]
        steps = []
        for r in ranks:
            cos, sin = r.rope.get(0, 6)
            local = r.rope_local.get(0, 6) if r.rope_local else None
            steps.append(StepContext([SequenceStep(0, 6, r.cache)], cos, sin, torch.float32, local))
        attn = sum(
            attention_partial(x, w, r.layout, i, s, cfg, window)
            for r, w, s in zip(ranks, ws, steps, strict=True)
        )
        x = residual_add(x, attn, ws[0].post_attn_norm, cfg)
        x = residual_add(x, sum(mlp_partial(x, w, cfg) for w in ws), ws[0].post_mlp_norm, cfg)
    return float((x - expected).abs().max())


@pytest.mark.parametrize("split", ["experts", "columns"])
@pytest.mark.parametrize("fixture", ["mixtral_dir", "qwen3_moe_dir"])
def test_expert_partials_sum_to_the_single_node(fixture, split, request):
    model_dir = request.getfixturevalue(fixture)
    for shares in ([2.0, 1.0, 1.0], [1.0, 1.0]):
        assert _lockstep(model_dir, shares, split) < 1e-5


@pytest.mark.parametrize("fixture", ["gemma2_dir", "gemma3_dir", "phi3_dir", "qwen3_dir"])
def test_dense_family_partials_sum_to_the_single_node(fixture, request):
    """Gemma's post norms see the sum, not a rank's partial; Phi-3's fused weights
    are cut per rank; Qwen3's head norms are per local head."""
    assert _lockstep(request.getfixturevalue(fixture), [2.0, 1.0, 1.0]) < 1e-5
