"""How a prefill step's forward is cut into groups of layers, so that the prefill worker can follow
an SM-partition switch between two groups instead of at the end of a whole prompt (hundreds of ms
for an 8K-19K-token prompt on the H100).

A group is sized to take about `max_step_s`: from the measured time per layer and token of earlier
groups (by prompt-length bucket: attention makes a layer's cost grow faster than the tokens), or
before any measurement from an estimate of the whole forward (the profile's prefill cost on the
SMs the prefill side has), or else one layer. Plain Python; the runner measures and reports.
"""

from __future__ import annotations

from collections.abc import Callable

_ALPHA = 0.5  # EWMA weight of a new measurement: prompt lengths and partitions change quickly


def _bucket(tokens: int) -> int:
    return 1 << max(0, int(tokens).bit_length() - 1)


class LayerGroups:
    def __init__(self, max_step_s: float, num_layers: int,
                 estimate_s: Callable[[int], float] | None = None) -> None:
        """estimate_s(tokens): the whole forward's time for a step of that many tokens, used
        until a group of that length was measured (None: one layer per group until then)."""
        if not max_step_s > 0:
            raise ValueError(f"max_step_s must be positive, got {max_step_s}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        self.max_step_s = max_step_s
        self.num_layers = num_layers
        self.estimate_s = estimate_s
        self._rate: dict[int, float] = {}  # token bucket -> seconds per (layer x token)

    def per_layer_s(self, tokens: int) -> float | None:
        """The expected time of one layer for a step of `tokens` tokens, None if unknown."""
        rate = self._rate.get(_bucket(tokens))
        if rate is None and self._rate:  # the nearest measured length, scaled linearly
            rate = self._rate[min(self._rate, key=lambda b: abs(b - tokens))]
        if rate is not None:
            return rate * tokens
        if self.estimate_s is not None:
            est = self.estimate_s(tokens)
            return est / self.num_layers if est > 0 else None
        return None

    def size(self, tokens: int) -> int:
        """Layers in the next group of a step of `tokens` tokens (1..num_layers)."""
        per_layer = self.per_layer_s(tokens)
        if per_layer is None or per_layer <= 0:
            return 1
        return max(1, min(self.num_layers, int(self.max_step_s / per_layer)))

    def measured(self, tokens: int, layers: int, seconds: float) -> None:
        """A group of `layers` layers over `tokens` tokens took `seconds`."""
        if tokens <= 0 or layers <= 0 or not seconds > 0:
            return
        b, rate = _bucket(tokens), seconds / (layers * tokens)
        old = self._rate.get(b)
        self._rate[b] = rate if old is None else old + _ALPHA * (rate - old)
