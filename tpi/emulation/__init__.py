"""Emulated small devices (link shaper, cgroup caps): for tpi cluster and benchmarks only."""
