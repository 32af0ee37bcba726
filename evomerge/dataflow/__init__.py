"""Data-flow-space merges: models that run a path through the layers of loaded source models."""

from evomerge.dataflow.model import LayerPool, layer_view
from evomerge.dataflow.path import DataFlowPath, PathSlice

__all__ = ["DataFlowPath", "PathSlice", "LayerPool", "layer_view"]
