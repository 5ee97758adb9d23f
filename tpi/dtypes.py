"""The float formats tpi names on its command line, in files and on the wire."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPUTE_DTYPES = {k: DTYPES[k] for k in ("fp32", "bf16")}  # what layers compute in
# How a split's manifest names the dtype its float tensors are stored in.
STORED_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
