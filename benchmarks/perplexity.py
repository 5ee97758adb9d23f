"""Perplexity of the embedded SmolLM2-135M-Instruct on a public-domain text
(tests/data/gettysburg.txt) for each weight format, in one run, with the bytes
of the layer weights each format stores.

    python benchmarks/perplexity.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_result  # noqa: E402

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "gettysburg.txt"
FORMATS = [("fp32", "none", 32), ("bf16", "bf16", 32), ("int8", "int8", 32)]
FORMATS += [("int4-g32", "int4", 32), ("int4-g64", "int4", 64), ("int4-g128", "int4", 128)]


def main() -> None:
    import os

    os.environ.setdefault("TPI_HOME", tempfile.mkdtemp(prefix="tpi-ppl-"))
    from tpi.master.loader import open_model
    from tpi.master.perplexity import perplexity
    from tpi.sources.default_model import ensure_default_model

    model = ensure_default_model(print)
    rows = {}
    base = None
    for name, quant, group in FORMATS:
        lm = open_model(str(model), "fp32", quiet=True, quant=quant, group_size=group)
        try:
            ids = lm.tokenizer.encode(TEXT.read_text())
            ppl = perplexity(lm.engine, ids)
            layers = lm.engine.decoder.layers
            weight_bytes = getattr(getattr(layers, "layout", None), "pass_bytes", None)
            if weight_bytes is None:
                weight_bytes = sum(w.nbytes() for w in layers.layers)
        finally:
            lm.close()
        base = base or ppl
        rows[name] = {
            "perplexity": round(ppl, 4),
            "vs_fp32": round(ppl / base, 4),
            "layer_weight_mb": round(weight_bytes / 1e6, 1),
        }
        print(name, rows[name])
    write_result(
        "perplexity",
        {"model": "SmolLM2-135M-Instruct", "text": TEXT.name, "tokens": len(ids), "formats": rows},
    )


if __name__ == "__main__":
    main()
