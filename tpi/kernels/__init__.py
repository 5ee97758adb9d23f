"""Native kernels for what torch does slowly on CPUs: products of a few rows with a
float32 or int8 weight read once, and int8 prompts (small_matmul), products of a few
rows with torch's packed int4 weights (int4_matmul), and a decode step's small
per-layer ops (decode_ops). C sources here are compiled at first use
(tpi.kernels.build) and loaded by tpi.kernels.native."""
