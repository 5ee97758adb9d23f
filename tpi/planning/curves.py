"""Measured times as functions of a slice's size: piecewise linear between the
measured points, extended along the last segment beyond them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Curve:
    """y(x) through measured (x, y) points (x strictly increasing after merging)."""

    points: tuple[tuple[float, float], ...]

    @classmethod
    def of(cls, pairs: list[tuple[float, float]]) -> Curve:
        merged: dict[float, list[float]] = {}
        for x, y in pairs:
            merged.setdefault(float(x), []).append(float(y))
        pts = tuple(sorted((x, min(ys)) for x, ys in merged.items()))
        if not pts:
            raise ValueError("a curve needs at least one point")
        return cls(pts)

    def __call__(self, x: float) -> float:
        p = self.points
        if len(p) == 1:
            # One point: proportional to size (the best guess for a matmul-bound phase).
            x0, y0 = p[0]
            return y0 * x / x0 if x0 else y0
        if x <= p[0][0]:
            (x0, y0), (x1, y1) = p[0], p[1]
        elif x >= p[-1][0]:
            (x0, y0), (x1, y1) = p[-2], p[-1]
        else:
            i = next(k for k in range(1, len(p)) if p[k][0] >= x)
            (x0, y0), (x1, y1) = p[i - 1], p[i]
        y = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        return max(0.0, y)

    def to_list(self) -> list[list[float]]:
        return [[x, y] for x, y in self.points]

    @classmethod
    def from_list(cls, values: list) -> Curve:
        return cls.of([(float(x), float(y)) for x, y in values])
