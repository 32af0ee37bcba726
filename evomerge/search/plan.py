"""`evomerge plan SPACE.yaml`: where a search's weights would live, from configs and headers only.

Reads the models' config.json and safetensors headers (no weights, seconds
even for 70B), checks that base and experts fit together (an expert may be a
LoRA adapter folder: its factors are accounted on the device), and places every
block of the merge (`evomerge.merge.planner`) within the budgets: the same
plan the merge core would make at the start of the search. A budget that
cannot hold the resident model, the workspace and the staging buffers is
refused here, naming the sizes.
"""

from __future__ import annotations

import torch

from evomerge.errors import EvomergeError
from evomerge.merge import get_method
from evomerge.merge.adapters import AdapterFiles, open_experts
from evomerge.merge.layout import Layout
from evomerge.merge.loading import open_model
from evomerge.merge.memory import Budgets, format_bytes
from evomerge.merge.planner import DEFAULT_DISK_BANDWIDTH, DEFAULT_HOST_BANDWIDTH, MemoryPlan, plan_memory
from evomerge.merge.statistics import get_kind
from evomerge.search.space import SearchSpace


def plan_space(space: SearchSpace, *, host_bandwidth: float = DEFAULT_HOST_BANDWIDTH,
               disk_bandwidth: float = DEFAULT_DISK_BANDWIDTH) -> tuple[MemoryPlan, str]:
    """The memory plan of a search space's merge (budgets from `space.memory`) and its description."""
    if space.merge is None:
        raise EvomergeError(f"{space.name} is a data-flow space: its layers are loaded whole, there is no merge "
                            "to plan")
    base = open_model(space.base)
    experts = open_experts(base, space.expert_paths)
    adapters = {e: files.device_bytes for e, files in enumerate(experts) if isinstance(files, AdapterFiles)}
    if space.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(space.device)
    budgets = Budgets.resolve(device, **space.memory)
    layout = Layout.from_files(base)
    plan = plan_memory(layout, len(experts), budgets, methods=[get_method(m) for m in space.merge.methods],
                       pinned=device.type == "cuda", what=f"merging {space.name} on {device}", adapters=adapters)
    header = (f"plan for {space.name}: {' / '.join(space.merge.methods)} on {device}, budgets: device {format_bytes(budgets.device)}, "
              f"host {format_bytes(budgets.host)}")
    lines = [header, plan.describe(host_bandwidth, disk_bandwidth)]
    for kind in dict.fromkeys(k for m in space.merge.methods for k in get_method(m).statistics):
        statistic = get_kind(kind)
        lines.append(f"data statistics ({kind}): {format_bytes(statistic.bytes(layout))} per expert on disk "
                     f"({format_bytes(statistic.bytes(layout) * len(experts))} in RUN/statistics/), read one tensor at "
                     "a time while merging (in the workspace above)")
    if space.optimizer_init == "learned":
        lines.append(learning_plan(plan, layout, budgets))
    return plan, "\n".join(lines)


def learning_plan(plan: MemoryPlan, layout: Layout, budgets: Budgets) -> str:
    """What learning the coefficients (`evomerge learn`) adds on the device: one merged copy of the model
    whose tensors carry the gradient (the task vectors are re-read in the backward, not kept); refused
    when that does not fit beside the merge core."""
    merged = layout.numel * layout.element_size
    needed = plan.device_bytes + merged
    text = (f"learning (AdaMerging): one merged model beside the core, {format_bytes(merged)} "
            f"({format_bytes(needed)} of {format_bytes(budgets.device)} on the device, before activations)")
    if needed > budgets.device:
        raise EvomergeError(f"{text}: over the device budget by {format_bytes(needed - budgets.device)}; give the "
                            "merge core less (memory.device) or learn on a larger device")
    return text
