"""Native kernels for what torch does slowly on CPUs: products of a few rows with a
weight read once (small_matmul), and a decode step's small per-layer ops (decode_ops).
C sources here are compiled at first use (tpi.kernels.build) and loaded by
tpi.kernels.native."""
