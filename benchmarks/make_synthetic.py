"""A synthetic model with real Llama-2-7B shapes and random bf16 weights (~13.5 GB).

Written once (with a progress bar) as a Hugging Face checkpoint and reused.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}


def make_synthetic(out: Path, cfg: dict = LLAMA2_7B, seed: int = 0) -> Path:
    from tests.factories import make_tokenizer
    from tpi.progress import ProgressReporter
    from tpi.storage.sharded_writer import ShardedWriter

    out = Path(out)
    if (out / "config.json").is_file() and (out / ".complete").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    h, i, v, n = (
        cfg["hidden_size"],
        cfg["intermediate_size"],
        cfg["vocab_size"],
        cfg["num_hidden_layers"],
    )

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    writer = ShardedWriter(out, max_shard_bytes=2 * 1024**3)
    with ProgressReporter("synthesizing") as progress:
        writer.add("model.embed_tokens.weight", rand(v, h))
        for layer in range(n):
            p = f"model.layers.{layer}."
            for name, shape in (
                ("self_attn.q_proj.weight", (h, h)),
                ("self_attn.k_proj.weight", (h, h)),
                ("self_attn.v_proj.weight", (h, h)),
                ("self_attn.o_proj.weight", (h, h)),
                ("mlp.gate_proj.weight", (i, h)),
                ("mlp.up_proj.weight", (i, h)),
                ("mlp.down_proj.weight", (h, i)),
            ):
                writer.add(p + name, rand(*shape))
            writer.add(p + "input_layernorm.weight", torch.ones(h, dtype=torch.bfloat16))
            writer.add(p + "post_attention_layernorm.weight", torch.ones(h, dtype=torch.bfloat16))
            progress(layer + 1, n + 1, f"layer {layer}")
        writer.add("model.norm.weight", torch.ones(h, dtype=torch.bfloat16))
        writer.add("lm_head.weight", rand(v, h))
        writer.finish()
        progress(n + 1, n + 1, "done")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    make_tokenizer(out)  # a small real tokenizer: tpi needs one; bench feeds random ids
    (out / ".complete").write_text("ok\n")
    return out


@click.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
def main(out: Path) -> None:
    click.echo(make_synthetic(out))


if __name__ == "__main__":
    main()
