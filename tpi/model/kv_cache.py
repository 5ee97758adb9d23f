"""Per-rank key/value cache for this rank's KV heads, all layers.

Writes go to absolute positions: a forward pass at position p overwrites
[p, p + T) and attends to [0, p + T). Rolling back (new chat turn that shares
only a prefix, a retried step) is therefore just starting at a lower position;
no explicit truncate message is needed between nodes.
"""

from __future__ import annotations

import torch


def kv_bytes_per_position(num_layers: int, n_kv: int, head_dim: int, elem: int) -> int:
    """Keys and values of one token, all layers: what the cache holds (and a decode
    step reads) per cached position. The one formula, for caches and plans alike."""
    return 2 * num_layers * n_kv * head_dim * elem


class KVCache:
    def __init__(
        self, num_layers: int, n_kv: int, head_dim: int, max_positions: int, dtype: torch.dtype
    ) -> None:
        self.num_layers = num_layers
        self.n_kv = n_kv
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.dtype = dtype
        self.capacity = 0
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []

    def _grow(self, needed: int) -> None:
        # Doubling keeps the amortized copy cost linear in sequence length.
        cap = min(self.max_positions, max(needed, 2 * self.capacity, 256))
        shape = (self.n_kv, cap, self.head_dim)
        new_k = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.num_layers)]
        new_v = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.num_layers)]
        for old, new in ((self._k, new_k), (self._v, new_v)):
            for o, n in zip(old, new, strict=False):
                n[:, : self.capacity] = o
        self._k, self._v, self.capacity = new_k, new_v, cap

    def reserve(self, positions: int) -> None:
        if positions > self.max_positions:
            raise ValueError(
                f"{positions} positions exceed the cache limit of {self.max_positions}"
            )
        if positions > self.capacity:
            self._grow(positions)

    def update(
        self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (n_kv, T, hd) at [pos, pos+T); return keys/values for [0, pos+T)."""
        end = pos + k.shape[1]
        self.reserve(end)
        kc, vc = self._k[layer], self._v[layer]
        kc[:, pos:end] = k
        vc[:, pos:end] = v
        return kc[:, :end], vc[:, :end]

    def buffers(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's whole key and value buffers (n_kv, capacity, hd), grown to
        hold `end` positions: a native decode kernel writes and reads them in place."""
        self.reserve(end)
        return self._k[layer], self._v[layer]

    @property
    def bytes_per_position(self) -> int:
        """Keys and values of one token, all layers (what a decode step reads per cached token)."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return kv_bytes_per_position(self.num_layers, self.n_kv, self.head_dim, elem)

    def nbytes(self) -> int:
        return self.capacity * self.bytes_per_position


class SlotCaches:
    """One KVCache per sequence slot of a batch, made on first use, freed on release.

    Each sequence keeps a contiguous cache (grown by doubling, so at most twice
    what it uses): attention reads one plain (heads, positions, hd) view per
    sequence with torch's own kernels, where a paged cache would need a gather
    per layer and step. Admission (tpi serve) counts every sequence's worst case,
    so the sum never outgrows the memory plan."""

    def __init__(
        self, num_layers: int, n_kv: int, head_dim: int, max_positions: int, dtype: torch.dtype
    ) -> None:
        self._args = (num_layers, n_kv, head_dim, max_positions, dtype)
        self.max_positions = max_positions
        self._slots: dict[int, KVCache] = {}

    def get(self, slot: int) -> KVCache:
        cache = self._slots.get(slot)
        if cache is None:
            cache = self._slots[slot] = KVCache(*self._args)
        return cache

    def release(self, slot: int) -> None:
        self._slots.pop(slot, None)

    @property
    def active(self) -> int:
        return len(self._slots)

    def capacity(self, slot: int) -> int:
        """Positions allocated for `slot` (0 when it has no cache)."""
        cache = self._slots.get(slot)
        return cache.capacity if cache is not None else 0

    @property
    def bytes_per_position(self) -> int:
        num_layers, n_kv, head_dim, _, dtype = self._args
        elem = torch.empty((), dtype=dtype).element_size()
        return kv_bytes_per_position(num_layers, n_kv, head_dim, elem)

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self._slots.values())
