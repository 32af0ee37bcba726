"""A data-flow path as a live model: a shell whose decoder layer list points at loaded layers.

`LayerPool` holds the source models (loaded once). `assemble(path)` returns one
reusable shell model (built on the meta device, so it owns no weights) whose
embeddings, final norm and LM head are the sources' own modules and whose
layer list holds one *view* per path position: a shallow copy of the source
layer that shares every parameter (a repeated layer costs no memory) but has
its own attention ``layer_idx``, so the KV cache keeps one entry per position.
Rotary position embeddings are computed once per forward from the token
positions and handed to every layer, so they are right for any path. Scaled
positions get forward hooks multiplying their attention and MLP outputs
(see `evomerge.dataflow.path` for why that is the scaling).

The shell's config says ``num_hidden_layers = len(path)`` (and per-position
``layer_types`` where the architecture has them), so teacher-forced scoring and
``generate`` with a cache both work on it.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Iterator, Mapping

import torch
from torch import nn

from evomerge.dataflow.path import DataFlowPath
from evomerge.errors import EvomergeError

BRANCH_OUTPUTS = ("self_attn.o_proj.", "mlp.down_proj.")
"""Layer tensors whose output ends a residual branch; scaling folds into them."""


def decoder_of(model) -> nn.Module:
    """The decoder stack (``model.model`` for *ForCausalLM), which holds ``layers``."""
    base = getattr(model, "base_model", None)
    if base is None or not isinstance(getattr(base, "layers", None), nn.ModuleList):
        raise EvomergeError(f"{type(model).__name__} has no decoder layer list (model.layers); "
                            "data-flow merges need a decoder-only transformer")
    return base


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object sharing parameters, buffers and submodules, with its own hook tables."""
    clone = module.__class__.__new__(module.__class__)
    clone.__dict__ = dict(module.__dict__)
    clone._modules = dict(module._modules)
    for key, value in module.__dict__.items():
        if key.startswith(("_forward", "_backward")) and isinstance(value, dict):
            clone.__dict__[key] = OrderedDict(value)
    return clone


def _scale_output(multiplier: float):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] * multiplier, *output[1:])
        return output * multiplier
    return hook


def layer_view(layer: nn.Module, position: int, multiplier: float = 1.0) -> nn.Module:
    """Source ``layer`` as path position ``position``: same weights, own cache slot, own scale."""
    view = _shallow_copy(layer)
    attention = _shallow_copy(layer.self_attn)
    attention.layer_idx = position
    view._modules["self_attn"] = attention
    if hasattr(view, "layer_idx"):
        view.layer_idx = position
    if multiplier != 1.0:
        mlp = _shallow_copy(layer.mlp)
        view._modules["mlp"] = mlp
        attention.register_forward_hook(_scale_output(multiplier))
        mlp.register_forward_hook(_scale_output(multiplier))
    return view


class LayerPool:
    """Loaded source models by name; every path is assembled from their modules without copies."""

    def __init__(self, models: Mapping[str, nn.Module]):
        if not models:
            raise EvomergeError("a data-flow merge needs at least one source model")
        self.models = dict(models)
        self.layers = {name: decoder_of(model).layers for name, model in self.models.items()}
        first = next(iter(self.models.values()))
        self.tied = bool(getattr(first.config, "tie_word_embeddings", False))
        config = copy.deepcopy(first.config)
        config.num_hidden_layers = 0
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = []
        with torch.device("meta"):
            self.shell = type(first)(config)
        self.shell.config._attn_implementation = first.config._attn_implementation
        self.shell.generation_config = copy.deepcopy(first.generation_config)
        self.shell.eval()
        self._layer_types = {name: getattr(model.config, "layer_types", None) for name, model in self.models.items()}

    def num_layers(self, source: str) -> int:
        return len(self.layers[source])

    def check(self, path: DataFlowPath) -> None:
        for source, index in path.layers:
            if source not in self.layers:
                raise EvomergeError(f"data-flow path names source {source!r}; loaded: {', '.join(self.layers)}")
            if not 0 <= index < len(self.layers[source]):
                raise EvomergeError(f"data-flow path names layer {index} of {source!r}, "
                                    f"which has {len(self.layers[source])} layers")

    def assemble(self, path: DataFlowPath) -> nn.Module:
        """The path as a model (the pool's one shell, valid until the next call)."""
        self.check(path)
        shell = self.shell
        decoder, embed_model, head_model = decoder_of(shell), self.models[path.embed_source], self.models[path.head_source]
        for name, module in decoder_of(embed_model).named_children():
            if name != "layers":  # embeddings, rotary embedding from the first source; final norm from the last
                source = embed_model if _is_embedding(name) else head_model
                decoder._modules[name] = decoder_of(source)._modules[name]
        head_source = embed_model if self.tied else head_model
        shell.set_output_embeddings(head_source.get_output_embeddings())
        decoder._modules["layers"] = nn.ModuleList(
            layer_view(self.layers[source][index], position, multiplier)
            for position, ((source, index), multiplier) in enumerate(zip(path.layers, path.multipliers()))
        )
        shell.config.num_hidden_layers = len(path)
        if getattr(shell.config, "layer_types", None) is not None:
            shell.config.layer_types = [self._layer_types[source][index] for source, index in path.layers]
        return shell

    def state_dict(self, path: DataFlowPath) -> Iterator[tuple[str, torch.Tensor]]:
        """The path's checkpoint tensors in order (layers renumbered, multipliers folded in).

        Tensors of unscaled positions are the sources' own (shared, not copied);
        a scaled branch output is a new tensor ``weight * multiplier``.
        """
        self.check(path)
        prefix = self.shell.base_model_prefix
        embed_model, head_model = self.models[path.embed_source], self.models[path.head_source]

        def decoder_tensors(model, embedding: bool):
            for child, module in decoder_of(model).named_children():
                if child != "layers" and _is_embedding(child) == embedding:
                    for key, tensor in module.state_dict().items():
                        yield f"{prefix}.{child}.{key}", tensor

        yield from decoder_tensors(embed_model, embedding=True)
        for position, ((source, index), multiplier) in enumerate(zip(path.layers, path.multipliers())):
            for name, tensor in self.layers[source][index].state_dict().items():
                if multiplier != 1.0 and name.startswith(BRANCH_OUTPUTS):
                    tensor = tensor * multiplier
                yield f"{prefix}.layers.{position}.{name}", tensor
        yield from decoder_tensors(head_model, embedding=False)
        if not self.tied:  # a tied head is the embedding, saved once
            for child, module in head_model.named_children():
                if child != prefix:
                    for key, tensor in module.state_dict().items():
                        yield f"{child}.{key}", tensor


def _is_embedding(child_name: str) -> bool:
    """Decoder children taken from the path's first source (token and rotary embeddings)."""
    return "embed" in child_name or "rotary" in child_name
