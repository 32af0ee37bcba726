"""Merge recipes: which method, which coefficients, and per-layer / per-module overrides.

A recipe is plain data (JSON round-trips through `to_dict`/`from_dict`) because
studies store one per trial and export turns it into a mergekit YAML later.
Each method's parameter spec (names, defaults, domains, which parameters are
per expert) lives with the method (`evomerge.merge.methods`) and mirrors
mergekit 0.1.5's, so both sides resolve the same values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from evomerge.errors import EvomergeError
from evomerge.merge.methods import METHODS, REQUIRED, MergeMethod, get_method

MODULE_TYPES = ("embed", "attention", "mlp", "norm")

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(tensor_name: str) -> Optional[int]:
    """Decoder layer index of a tensor (`...layers.<i>....`), None outside the layer stack."""
    match = _LAYER_RE.search(tensor_name)
    return int(match.group(1)) if match else None


def module_type_of(tensor_name: str) -> Optional[str]:
    """Module type used by overrides; checked in this order: embed, norm, attention, mlp.

    A norm inside attention (e.g. q_norm) counts as `norm`; the mergekit YAML
    export emits its filters in the same order so both agree.
    """
    if "embed_tokens" in tensor_name or "lm_head" in tensor_name:
        return "embed"
    if "norm" in tensor_name:
        return "norm"
    if "self_attn" in tensor_name:
        return "attention"
    if "mlp" in tensor_name:
        return "mlp"
    return None


def _plain(value: Any) -> Any:
    """Turn numpy scalars / tuples into JSON-native Python values."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool):
        return value
    if hasattr(value, "item") and not isinstance(value, (int, float)):
        value = value.item()
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float):
        return value
    return value


@dataclass
class Override:
    """Parameters that replace the recipe's for some layers and/or module types.

    `layers=None` means every tensor (including embeddings and the final norm);
    a layer list only matches tensors inside those decoder layers.
    """

    layers: Optional[list[int]] = None
    modules: Optional[list[str]] = None
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.layers is not None:
            self.layers = [_plain(v) for v in self.layers]
            for layer in self.layers:
                if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
                    raise EvomergeError(f"override layers must be non-negative integers, got {layer!r}")
        if self.modules is not None:
            self.modules = list(self.modules)
            for module in self.modules:
                if module not in MODULE_TYPES:
                    raise EvomergeError(
                        f"unknown module type {module!r} in override; valid: {', '.join(MODULE_TYPES)}"
                    )
        self.params = {str(k): _plain(v) for k, v in dict(self.params).items()}

    def matches(self, layer: Optional[int], module_type: Optional[str]) -> bool:
        if self.layers is not None and layer not in self.layers:
            return False
        if self.modules is not None and module_type not in self.modules:
            return False
        return True

    def to_dict(self) -> dict:
        return {"layers": self.layers, "modules": self.modules, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, data: dict) -> "Override":
        return cls(layers=data.get("layers"), modules=data.get("modules"), params=data.get("params", {}))


@dataclass
class Recipe:
    """One candidate merge: method, its parameters, and overrides (later ones win)."""

    method: str
    params: dict = field(default_factory=dict)
    overrides: list = field(default_factory=list)

    def __post_init__(self):
        get_method(self.method)
        self.params = {str(k): _plain(v) for k, v in dict(self.params).items()}
        self.overrides = [o if isinstance(o, Override) else Override.from_dict(o) for o in self.overrides]
        spec = self.spec
        for where, params in [("recipe", self.params)] + [
            (f"override {i}", o.params) for i, o in enumerate(self.overrides)
        ]:
            for name, value in params.items():
                spec.check_param(name, value, where)
                if where != "recipe" and spec.param(name).recipe_wide:
                    raise EvomergeError(
                        f"parameter {name!r} of {spec.name!r} holds for the whole merge; set it in the recipe's "
                        f"params, not in {where}"
                    )

    @property
    def spec(self) -> MergeMethod:
        """The registered merge method (parameter spec, side data, math)."""
        return METHODS[self.method]

    def snapped(self) -> "Recipe":
        """The same recipe with grid parameters (TIES / breadcrumbs density, gamma) on their grid."""
        spec = self.spec
        return Recipe(
            self.method,
            spec.snap(self.params),
            [Override(o.layers, o.modules, spec.snap(o.params)) for o in self.overrides],
        )

    # -- resolution ---------------------------------------------------------
    def params_for(self, tensor_name: str) -> dict:
        """Explicit parameters for one tensor: recipe params updated by each matching override."""
        return self.params_for_position(layer_of(tensor_name), module_type_of(tensor_name))

    def params_for_position(self, layer: Optional[int], module_type: Optional[str]) -> dict:
        result = dict(self.params)
        for override in self.overrides:
            if override.matches(layer, module_type):
                result.update(override.params)
        return result

    def resolved_params(self, layer: Optional[int], module_type: Optional[str], num_experts: int) -> dict:
        """All parameters with method defaults filled in and per-expert values as lists.

        Raises EvomergeError for missing required parameters, wrong list lengths
        and combinations that are only invalid together (della density±epsilon).
        """
        spec = self.spec
        explicit = self.params_for_position(layer, module_type)
        where = f"layer {layer}" if layer is not None else "non-layer tensors"
        if module_type:
            where += f", module {module_type}"
        resolved = {}
        for name, default in spec.defaults.items():
            value = explicit.get(name, default)
            if value is REQUIRED:
                raise EvomergeError(f"merge method {spec.name!r} needs parameter {name!r} ({where})")
            if name in spec.per_expert:
                if isinstance(value, list):
                    if len(value) != num_experts:
                        raise EvomergeError(
                            f"parameter {name!r} has {len(value)} values but there are "
                            f"{num_experts} experts ({where})"
                        )
                    value = list(value)
                else:
                    value = [value] * num_experts
            resolved[name] = value
        spec.check_resolved(resolved, where)
        return resolved

    def validate(self, num_experts: int) -> None:
        """Check expert counts and list lengths against the actual number of experts."""
        self.spec.check_experts(num_experts)
        for where, params in [("recipe", self.params)] + [
            (f"override {i}", o.params) for i, o in enumerate(self.overrides)
        ]:
            for name, value in params.items():
                if isinstance(value, list) and len(value) != num_experts:
                    raise EvomergeError(
                        f"parameter {name!r} in {where} has {len(value)} values but there are "
                        f"{num_experts} experts"
                    )
        # Required parameters must resolve everywhere; the base params alone may
        # omit them only if every position is covered, so check the base position.
        positions = {(None, m) for m in (*MODULE_TYPES, None)}
        for override in self.overrides:
            for layer in override.layers or [None]:
                for module in override.modules or [*MODULE_TYPES, None]:
                    positions.add((layer, module))
        for layer, module in positions:
            self.resolved_params(layer, module, num_experts)

    # -- serialisation ------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "params": dict(self.params),
            "overrides": [o.to_dict() for o in self.overrides],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        if not isinstance(data, dict) or "method" not in data:
            raise EvomergeError(f"a recipe must be a mapping with a 'method' key, got {data!r}")
        unknown = set(data) - {"method", "params", "overrides"}
        if unknown:
            raise EvomergeError(f"unknown recipe key(s): {', '.join(sorted(unknown))}")
        return cls(
            method=data["method"],
            params=data.get("params") or {},
            overrides=[Override.from_dict(o) for o in data.get("overrides") or []],
        )
