"""Where every tensor of a model lives in the merge core's flat layout, and its blocks.

Every floating tensor gets a slice of one flat index space (embeddings first,
then the decoder layers in order, then the final norm and head). Consecutive
tensors of one decoder layer (or of the tensors before / after the layer
stack) form a *block*, split where it would exceed `block_elements`: the unit
the memory planner places in a tier and the streamed merge walks. A layout is
built from safetensors headers or from a bare config (no weights), so plans
for 70B models cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from evomerge.merge.recipe import layer_of, module_type_of

DEFAULT_BLOCK_ELEMENTS = 1 << 26


@dataclass
class TensorSlot:
    """Where one tensor lives in the flat layout and which overrides can reach it."""

    index: int
    name: str
    shape: tuple
    offset: int
    numel: int
    layer: Optional[int]
    module_type: Optional[str]

    @property
    def end(self) -> int:
        return self.offset + self.numel


@dataclass
class Block:
    """Consecutive tensors of one layer (or of the non-layer tensors) placed and streamed together."""

    index: int
    label: str
    slots: list = field(default_factory=list)
    group: tuple = ()  # ("layer", i), ("before",) or ("after",)

    @property
    def start(self) -> int:
        return self.slots[0].offset

    @property
    def end(self) -> int:
        return self.slots[-1].end

    @property
    def numel(self) -> int:
        return self.end - self.start


def _slot_order(name: str):
    layer = layer_of(name)
    if layer is not None:
        return (1, layer, name)
    return (0 if "embed" in name else 2, 0, name)


def _group(name: str):
    layer = layer_of(name)
    return ("layer", layer) if layer is not None else (("before",) if "embed" in name else ("after",))


@dataclass
class Layout:
    """Flat layout of the merged (floating) tensors, their blocks, and the other tensors."""

    slots: list
    blocks: list
    dtype: torch.dtype
    num_layers: int
    passthrough: dict  # name -> (shape, dtype) of non-floating tensors, copied from the base as they are

    @property
    def numel(self) -> int:
        return self.slots[-1].end if self.slots else 0

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def largest_tensor(self) -> int:
        return max((s.numel for s in self.slots), default=0)

    @property
    def largest_block(self) -> int:
        return max((b.numel for b in self.blocks), default=0)

    @property
    def passthrough_bytes(self) -> int:
        total = 0
        for shape, dtype in self.passthrough.values():
            count = 1
            for s in shape:
                count *= s
            total += count * torch.empty((), dtype=dtype).element_size()
        return total

    @classmethod
    def build(cls, shapes: dict, dtypes: dict, num_layers: int, dtype: Optional[torch.dtype] = None,
              block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> "Layout":
        """Layout of tensors `shapes` (name -> shape) with `dtypes` (name -> torch dtype).

        `dtype=None` takes the most common floating dtype of the checkpoint.
        """
        float_names = [n for n, d in dtypes.items() if d.is_floating_point]
        if dtype is None:
            counts: dict = {}
            for name in float_names:
                counts[dtypes[name]] = counts.get(dtypes[name], 0) + 1
            dtype = max(counts, key=counts.get) if counts else torch.float32
        slots, offset = [], 0
        for index, name in enumerate(sorted(float_names, key=_slot_order)):
            shape = tuple(shapes[name])
            numel = 1
            for s in shape:
                numel *= s
            slots.append(TensorSlot(index, name, shape, offset, numel, layer_of(name), module_type_of(name)))
            offset += numel
        cap = max([block_elements] + [s.numel for s in slots])
        blocks: list = []
        for slot in slots:
            group = _group(slot.name)
            last = blocks[-1] if blocks else None
            if last is not None and last.group == group and last.numel + slot.numel <= cap:
                last.slots.append(slot)
                continue
            label = f"layer {group[1]}" if group[0] == "layer" else group[0]
            if last is not None and last.group == group:
                label += " (cont.)"
            blocks.append(Block(len(blocks), label, [slot], group))
        passthrough = {n: (tuple(shapes[n]), d) for n, d in dtypes.items() if not d.is_floating_point}
        return cls(slots, blocks, dtype, num_layers, passthrough)

    @classmethod
    def from_files(cls, model_files, dtype=None, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> "Layout":
        return cls.build(model_files.shapes, model_files.dtypes, model_files.num_layers, dtype, block_elements)

    @classmethod
    def from_config(cls, config: dict, dtype=torch.bfloat16, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> "Layout":
        """The layout of a Hugging Face config's model, without weights (built on the meta device)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        hf_config = AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        dtypes = {n: p.dtype for n, p in model.named_parameters()}
        return cls.build(shapes, dtypes, int(config.get("num_hidden_layers", 0)), dtype, block_elements)
