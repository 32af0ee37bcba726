"""Statistics some merge methods need from data: collected once per source model, read per tensor at merge time.

Data-informed methods weigh each expert by what its weights do on its own task's
inputs: RegMean solves each linear layer from the Gram matrix of the inputs it
sees (``gram``: ``X^T X`` over the tokens of a batch of prompts), Fisher merging
weighs every parameter by the model's diagonal Fisher information there
(``fisher``: the mean squared gradient of the log-likelihood of the model's own
next-token prediction, one prompt at a time). Each kind is one `StatisticKind`
behind the `KINDS` registry: what it collects from a model over prompts, and
how many bytes it takes.

Collected statistics are saved as one safetensors file per (kind, expert)
(`StatisticsFiles`), and the merge core reads them per tensor when a block is
merged (mmapped: only the tensors of the block being merged are in memory), so
they follow the memory plan like the task vectors do. The prompts come from the
search (`evomerge.search.statistics`), never from the scored items' answers.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from evomerge.errors import EvomergeError
from evomerge.files import atomic_write
from evomerge.merge.layout import Layout

Prompts = Sequence[Sequence[int]]
"""Token ids of each prompt, as the model reads it (`evomerge.benchmarks.prompts.prompt_ids`)."""


class StatisticKind(ABC):
    """One statistic of a source model on data."""

    name: str = ""

    @abstractmethod
    def collect(self, model, prompts: Prompts, pad_id: int, batch_size: int = 8, seed: int = 0,
                tick: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
        """Tensor name -> the statistic for that merge tensor (float32, on CPU)."""

    @abstractmethod
    def bytes(self, layout: Layout) -> int:
        """Bytes one expert's statistic takes (file size, float32)."""

    def largest_tensor_bytes(self, layout: Layout) -> int:
        """Bytes of the largest single statistic tensor (what a merge holds per expert at once)."""
        return 0


def linear_weights(model) -> dict[str, torch.nn.Linear]:
    """The model's ``nn.Linear`` layers by the name of their weight tensor (a tied head included once)."""
    found, seen = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            found[f"{name}.weight"] = module
    return found


def _batches(prompts: Prompts, pad_id: int, batch_size: int, device) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded id batches and their token masks (a causal model needs no attention mask then)."""
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start:start + batch_size]]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, prompt in enumerate(chunk):
            ids[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
            mask[row, :len(prompt)] = True
        yield ids.to(device), mask.to(device)


class Gram(StatisticKind):
    """``X^T X / tokens`` of the inputs of every linear layer (RegMean's statistic), per weight tensor.

    Layers reading the same input (q/k/v, gate/up) keep one matrix each: RegMean solves
    every weight from its own Gram, and sharing would save memory only, not change the math.
    """

    name = "gram"

    def collect(self, model, prompts, pad_id, batch_size=8, seed=0, tick=None):
        linears = linear_weights(model)
        device = next(model.parameters()).device
        sums = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float32, device=device)
                for name, m in linears.items()}
        tokens = 0
        current_mask: list[torch.Tensor] = []

        def hook(name):
            def record(module, inputs, output):
                x = inputs[0].detach().float()
                x = x[current_mask[0]] if x.dim() == 3 else x.reshape(-1, x.shape[-1])
                sums[name].addmm_(x.T, x)
            return record

        handles = [module.register_forward_hook(hook(name)) for name, module in linears.items()]
        try:
            with torch.no_grad():
                for ids, mask in _batches(prompts, pad_id, batch_size, device):
                    current_mask[:] = [mask]
                    model(input_ids=ids)
                    tokens += int(mask.sum())
                    if tick is not None:
                        tick(len(ids))
        finally:
            for handle in handles:
                handle.remove()
        return {name: (total / max(tokens, 1)).cpu() for name, total in sums.items()}

    def bytes(self, layout):
        return sum(slot.shape[1] ** 2 * 4 for slot in layout.slots if len(slot.shape) == 2)

    def largest_tensor_bytes(self, layout):
        return max((slot.shape[1] ** 2 * 4 for slot in layout.slots if len(slot.shape) == 2), default=0)


class Fisher(StatisticKind):
    """The diagonal Fisher information of every floating parameter: the mean over prompts of the squared
    gradient of ``log p(y | prompt)`` for ``y`` drawn from the model's own next-token distribution at the
    end of the prompt (a one-sample estimate of the true Fisher; unlabelled prompts suffice)."""

    name = "fisher"

    def collect(self, model, prompts, pad_id, batch_size=8, seed=0, tick=None):
        params = {name: p for name, p in model.named_parameters() if p.is_floating_point()}
        flags = {name: p.requires_grad for name, p in params.items()}
        sums = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in params.items()}
        device = next(model.parameters()).device
        generator = torch.Generator(device="cpu").manual_seed(seed)
        try:
            for p in params.values():
                p.requires_grad_(True)
            for prompt in prompts:  # one prompt at a time: the Fisher is a mean of squared per-example gradients
                ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
                logits = model(input_ids=ids).logits[0, -1].float()
                logp = torch.log_softmax(logits, dim=-1)
                choice = int(torch.multinomial(logp.detach().exp().cpu(), 1, generator=generator))
                model.zero_grad(set_to_none=True)
                logp[choice].backward()
                for name, p in params.items():
                    if p.grad is not None:
                        sums[name].add_(p.grad.detach().float().pow(2))
                if tick is not None:
                    tick(1)
        finally:
            model.zero_grad(set_to_none=True)
            for name, p in params.items():
                p.requires_grad_(flags[name])
        return {name: (total / max(len(prompts), 1)).cpu() for name, total in sums.items()}

    def bytes(self, layout):
        return layout.numel * 4

    def largest_tensor_bytes(self, layout):
        return layout.largest_tensor * 4


KINDS: dict[str, StatisticKind] = {kind.name: kind for kind in (Gram(), Fisher())}


def get_kind(name: str) -> StatisticKind:
    kind = KINDS.get(name)
    if kind is None:
        raise EvomergeError(f"unknown data statistic {name!r}; known: {', '.join(KINDS)}")
    return kind


class StatisticsFiles:
    """Saved statistics: ``<folder>/<kind>/<expert index>.safetensors``, read per tensor (mmapped).

    ``get(kind, tensor, expert)`` is what a merge method calls for the tensor it merges.
    """

    INDEX = "statistics.json"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._handles: dict = {}

    def path(self, kind: str, expert: int) -> Path:
        return self.folder / kind / f"expert{expert}.safetensors"

    def has(self, kind: str, expert: int) -> bool:
        return self.path(kind, expert).is_file()

    def save(self, kind: str, expert: int, tensors: dict[str, torch.Tensor], inputs: dict) -> Path:
        """Write one expert's statistic whole or not at all, with what it was made from."""
        path = self.path(kind, expert)
        with atomic_write(path) as tmp:
            save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp),
                      metadata={"evomerge_inputs": json.dumps(inputs, sort_keys=True)})
        self._handles.pop((kind, expert), None)
        return path

    def inputs(self, kind: str, expert: int) -> dict | None:
        """What a saved statistic was made from (None when it is missing or unreadable)."""
        if not self.has(kind, expert):
            return None
        try:
            with safe_open(str(self.path(kind, expert)), framework="pt") as handle:
                return json.loads((handle.metadata() or {}).get("evomerge_inputs", "null"))
        except (OSError, ValueError):  # a torn or foreign file: collected again
            return None

    def get(self, kind: str, tensor: str, expert: int) -> torch.Tensor | None:
        """Expert ``expert``'s statistic for ``tensor`` (CPU, float32), None when the kind has none for it."""
        key = (kind, expert)
        if key not in self._handles:
            if not self.has(kind, expert):
                raise EvomergeError(f"no {kind} statistics for expert {expert} in {self.folder}; collect them first "
                                    "(a search collects what its merge method needs)")
            self._handles[key] = safe_open(str(self.path(kind, expert)), framework="pt")
        handle = self._handles[key]
        return handle.get_tensor(tensor) if tensor in handle.keys() else None
