"""Weights on disk: checkpoints, safetensors files, splits, manifests, shards."""
