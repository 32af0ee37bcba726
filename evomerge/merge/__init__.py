"""In-memory merge core with mergekit-equal math, memory budgets, recipes, and mergekit YAML export."""

from evomerge.merge.core import MergeCore
from evomerge.merge.loading import ModelFiles, check_compatible, open_model
from evomerge.merge.mergekit_yaml import recipe_to_mergekit_yaml
from evomerge.merge.methods import METHODS, get_method
from evomerge.merge.recipe import MODULE_TYPES, Override, Recipe, layer_of, module_type_of

__all__ = [
    "MergeCore",
    "Recipe",
    "Override",
    "METHODS",
    "get_method",
    "MODULE_TYPES",
    "layer_of",
    "module_type_of",
    "open_model",
    "check_compatible",
    "ModelFiles",
    "recipe_to_mergekit_yaml",
]
