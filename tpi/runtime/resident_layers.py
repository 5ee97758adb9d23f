"""A LayerSource whose layers are all held in memory: nothing to load or evict."""

from __future__ import annotations

from tpi.model.weights import LayerWeights
from tpi.runtime.sliding_window import StreamStats


class ResidentLayers:
    def __init__(self, layers: list[LayerWeights]) -> None:
        self.layers = layers
        self.window = len(layers)
        self.stats = StreamStats()  # never reads from disk
        self.resident_bytes = sum(w.nbytes() for w in layers)

    @property
    def pass_bytes(self) -> int:
        """What one forward pass reads from RAM: every layer's weights as held."""
        return self.resident_bytes

    def start_pass(self) -> None:
        pass

    def acquire(self, layer: int) -> LayerWeights:
        return self.layers[layer]

    def release(self, layer: int) -> None:
        pass

    def close(self) -> None:
        self.layers = []
