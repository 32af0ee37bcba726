"""A data-flow path: which source layers a merged model runs, in order, and how the stream is scaled.

Position k runs layer ``layers[k] = (source, index)`` of a loaded source model.
``scales[k]`` multiplies the hidden state entering position k (Sakana's DFS
scaling, 1 = none). The embeddings come from the first position's source and
the final norm and LM head from the last one's, as mergekit's ``passthrough``
takes them from the first and last slice.

Scaling is evaluated and exported in its *folded* form. In a pre-norm decoder
(Llama, Mistral, Qwen2/3) a layer computes ``h + A(N(h))`` then ``+ F(N(.))``
and the RMS norm ``N`` ignores the scale of its input, so multiplying the stream
by s before a layer equals dividing that layer's (and every later layer's)
branch outputs (``o_proj``, ``down_proj``) by s, with the whole stream s times
larger, which the final norm removes. Position k's branch outputs are therefore
multiplied by ``1 / (scales[0] * ... * scales[k])`` (`multipliers`): the same
function as scaling the hidden state, up to the norm's epsilon (eps / s^2 in
place of eps), and a plain per-position weight scale in the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from evomerge.errors import EvomergeError


@dataclass(frozen=True)
class PathSlice:
    """Consecutive positions running layers ``start..stop-1`` of one source with one multiplier."""

    source: str
    start: int
    stop: int
    multiplier: float

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass
class DataFlowPath:
    layers: list[tuple[str, int]]
    scales: list[float]

    def __post_init__(self):
        self.layers = [(str(source), int(index)) for source, index in self.layers]
        self.scales = [float(s) for s in self.scales]
        if not self.layers:
            raise EvomergeError("a data-flow path needs at least one layer")
        if len(self.scales) != len(self.layers):
            raise EvomergeError(f"a data-flow path has {len(self.layers)} layers but {len(self.scales)} scales")
        bad = [s for s in self.scales if not (math.isfinite(s) and s > 0)]
        if bad:
            raise EvomergeError(f"data-flow path scales must be positive and finite, got {bad[0]}")

    def __len__(self) -> int:
        return len(self.layers)

    @classmethod
    def unscaled(cls, layers) -> "DataFlowPath":
        layers = list(layers)
        return cls(layers, [1.0] * len(layers))

    @property
    def embed_source(self) -> str:
        return self.layers[0][0]

    @property
    def head_source(self) -> str:
        return self.layers[-1][0]

    @property
    def is_scaled(self) -> bool:
        return any(s != 1.0 for s in self.scales)

    def multipliers(self) -> list[float]:
        """Per position, the factor on its branch outputs: 1 / (product of the scales so far)."""
        result, product = [], 1.0
        for scale in self.scales:
            product *= scale
            result.append(1.0 / product)
        return result

    def slices(self) -> list[PathSlice]:
        """Runs of consecutive layers of one source with one multiplier (mergekit slices)."""
        slices: list[PathSlice] = []
        for (source, index), multiplier in zip(self.layers, self.multipliers()):
            last = slices[-1] if slices else None
            if last and last.source == source and last.stop == index and last.multiplier == multiplier:
                slices[-1] = PathSlice(source, last.start, index + 1, multiplier)
            else:
                slices.append(PathSlice(source, index, index + 1, multiplier))
        return slices

    def describe(self) -> str:
        """Short human form, e.g. ``arith[0:2] lang[1:4]x0.71``."""
        return " ".join(f"{s.source}[{s.start}:{s.stop}]" + (f"x{s.multiplier:.3g}" if s.multiplier != 1.0 else "")
                        for s in self.slices())

    def to_dict(self) -> dict:
        return {"layers": [[s, i] for s, i in self.layers], "scales": list(self.scales)}

    @classmethod
    def from_dict(cls, data: dict) -> "DataFlowPath":
        return cls([tuple(x) for x in data["layers"]], list(data["scales"]))
