"""Native kernels for what torch does slowly on CPUs: products of a few rows with a
weight read once. C sources here are compiled at first use (tpi.kernels.build)."""
