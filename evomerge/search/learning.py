"""AdaMerging: the space's merge coefficients learned by gradient descent on unlabelled prompts.

Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning" (ICLR 2024): the merged
weights are a differentiable function of the coefficients (task arithmetic: ``base + lambda *
sum_e w_e tau_e``, per tensor group at the space's granularity: global is task-wise AdaMerging,
layer is layer-wise), and the coefficients descend the entropy of the merged model's answers on
unlabelled prompts: over the choices for multiple choice (the softmax of their summed
log-likelihoods), over the vocabulary for the first answer token of exact-match and generated
answers. Each benchmark's entropy is divided by its maximum (log of the choices or of the
vocabulary) and weighted like its accuracy in the fitness. Only the coefficients get gradients;
after every Adam step they are clipped to their genes' bounds, so the result is a genome of the
space: stored in the study (`StudyKey.LEARNED`), enqueued and scored as a trial like a baseline,
and a start for CMA-ES (`optimizer: {init: learned}`).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch
from torch.func import functional_call

from evomerge.benchmarks.kinds.teacher_forcing import forward_targets, teacher_forced_rows
from evomerge.benchmarks.prompts import pad_id, prompt_ids, tokenize
from evomerge.console import ProgressBar
from evomerge.errors import EvomergeError
from evomerge.merge import get_method
from evomerge.search.candidates import ParameterMerge
from evomerge.search.data_statistics import UnlabelledSet
from evomerge.search.genome import gene_name, group_of, tensor_groups
from evomerge.search.space import LearnSettings, check_learnable

class _TaskArithmetic(torch.autograd.Function):
    """``base + scale * sum_e w_e tau_e`` (``/ sum_e w_e`` when normalized) for one tensor of the core,
    in float32, returned in the core's dtype; the backward re-reads the task vectors."""

    @staticmethod
    def forward(ctx, w, scale, core, slot, normalize):
        ctx.core, ctx.slot, ctx.normalize = core, slot, normalize
        ctx.save_for_backward(w, scale)
        mixed = torch.zeros(slot.numel, dtype=torch.float32, device=w.device)
        for e in range(len(w)):
            mixed.add_(core.task_vector(slot, e).to(torch.float32), alpha=float(w[e]))
        if normalize:
            mixed /= w.sum()
        return (core.base_view(slot).to(torch.float32) + scale * mixed).to(core.dtype)

    @staticmethod
    def backward(ctx, grad):
        w, scale = ctx.saved_tensors
        core, slot = ctx.core, ctx.slot
        g = grad.reshape(-1).to(torch.float32)
        dots = torch.stack([torch.dot(g, core.task_vector(slot, e).to(torch.float32)) for e in range(len(w))])
        total = w.sum()
        mixed_dot = torch.dot(w, dots) / (total if ctx.normalize else 1.0)  # <g, sum_e w_e tau_e (/ sum w)>
        grad_w = scale * ((dots - mixed_dot) / total if ctx.normalize else dots)
        return grad_w, mixed_dot.reshape(scale.shape), None, None, None


@dataclass
class LearnResult:
    genome: dict[str, float]
    losses: list[float]
    seconds: float
    prompts: int = 0  # prompts read over every step (each forward and backward once): what learning cost


class CoefficientLearner:
    """The space's genome as a tensor of coefficients, the merged model as a function of it, and its loss."""

    def __init__(self, builder: ParameterMerge, sets: dict[str, UnlabelledSet], weights: dict[str, float],
                 settings: LearnSettings, seed: int = 0):
        merge = builder.merge
        check_learnable(merge.method)
        if not sets:
            raise EvomergeError("evomerge learn reads unlabelled prompts: give a benchmark a `data:` source")
        self.builder, self.core, self.sets, self.settings = builder, builder.core, sets, settings
        self.weights = {name: weights[name] for name in sets}
        self.rng = random.Random(seed)
        self.names = list(builder.genes)
        self.bounds = torch.tensor([builder.genes[n].bounds for n in self.names], dtype=torch.float64)
        resolved = get_method(merge.method).defaults | merge.fixed
        self.normalize = bool(resolved.get("normalize", False))
        self.fixed_lambda = float(resolved.get("lambda", 1.0))
        experts = builder.space.expert_names
        index = {name: i for i, name in enumerate(self.names)}
        groups = tensor_groups(merge, self.core.num_layers)
        self.slot_genes = []  # per slot: (gene index of each expert's weight, gene index of lambda or None)
        for slot in self.core.slots:
            group = group_of(groups, slot.layer, slot.module_type)
            if group.name in builder.inert:  # no expert changes it: the base whatever the coefficients
                self.slot_genes.append((None, None))
                continue
            weight_genes = [index[gene_name("weight", e, group.name)] for e in experts]
            lambda_gene = index.get(gene_name("lambda", None, group.name))
            self.slot_genes.append((weight_genes, lambda_gene))
        self.tokenizer = builder.tokenizer
        self.device = self.core.device

    # ------------------------------------------------------------ the merge as a function
    def merged_parameters(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameter name -> merged tensor (the core's dtype), differentiable in ``coefficients`` (one per gene).

        Each tensor is a `_TaskArithmetic` node: its backward re-reads the task vectors from the
        merge core (resident, staged or streamed, as the memory plan placed them) instead of keeping
        float32 copies for the graph, so learning needs one merged model beside the core, not one per expert.
        """
        params = {}
        fixed = torch.tensor(self.fixed_lambda, dtype=torch.float32, device=self.device)
        for slot, (weight_genes, lambda_gene) in zip(self.core.slots, self.slot_genes):
            if weight_genes is None:  # an inert group: the base's values
                params[slot.name] = self.core.base_view(slot).view(slot.shape)
                continue
            w = coefficients[weight_genes].to(torch.float32)
            scale = coefficients[lambda_gene].to(torch.float32) if lambda_gene is not None else fixed
            params[slot.name] = _TaskArithmetic.apply(w, scale, self.core, slot, self.normalize).view(slot.shape)
        return params

    # ------------------------------------------------------------ the objective
    def loss(self, coefficients: torch.Tensor, batches: dict[str, list]) -> torch.Tensor:
        """The weighted mean of each benchmark's normalized answer entropy on its batch of prompts."""
        params = self.merged_parameters(coefficients)
        model = self.builder.model
        total, weight_sum = 0.0, 0.0
        for name, items in batches.items():
            entropy = self._entropy(model, params, self.sets[name], items)
            total = total + self.weights[name] * entropy
            weight_sum += self.weights[name]
        return total / weight_sum

    def _entropy(self, model, params, unlabelled: UnlabelledSet, items) -> torch.Tensor:
        bench = unlabelled.bench
        prompts = prompt_ids(bench, items, self.tokenizer)
        if all(item.choices is not None for item in items):
            return self._choice_entropy(model, params, bench, items, prompts)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id(self.tokenizer), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, :len(prompt)] = torch.tensor(prompt)
        logits = functional_call(model, params, args=(), kwargs={"input_ids": ids.to(self.device)}).logits
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        logp = torch.log_softmax(logits[torch.arange(len(prompts), device=self.device), last].float(), dim=-1)
        entropy = -(logp.exp() * logp).sum(dim=-1)
        return entropy.mean() / math.log(logp.shape[-1])

    def _choice_entropy(self, model, params, bench, items, prompts) -> torch.Tensor:
        owners = [i for i, item in enumerate(items) for _ in item.choices]
        choices = tokenize(self.tokenizer, [bench.prompting.delimiter + c for item in items for c in item.choices])
        ids, mask = teacher_forced_rows([prompts[i] for i in owners], choices, pad_id(self.tokenizer), self.device)

        class _Call:  # forward_targets calls model(input_ids=...): route it through the merged parameters
            def __call__(self, input_ids):
                return functional_call(model, params, args=(), kwargs={"input_ids": input_ids})

        logits, targets, scored = forward_targets(_Call(), ids, mask)
        token_logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        choice_logp = (token_logp * scored).sum(dim=1)
        entropies, offset = [], 0
        for item in items:
            n = len(item.choices)
            p = torch.log_softmax(choice_logp[offset:offset + n], dim=0)
            entropies.append(-(p.exp() * p).sum() / math.log(n))
            offset += n
        return torch.stack(entropies).mean()

    def sample(self) -> dict[str, list]:
        """One batch of prompts per benchmark (seeded)."""
        batch = self.settings.batch
        return {name: self.rng.sample(s.items, min(batch, len(s.items))) for name, s in self.sets.items()}

    # ------------------------------------------------------------ learning
    def initial(self) -> torch.Tensor:
        low, high = self.bounds[:, 0], self.bounds[:, 1]
        start = (low + high) / 2 if self.settings.init is None else torch.full_like(low, self.settings.init)
        return torch.minimum(torch.maximum(start, low), high)

    def learn(self, progress: bool = True, start: dict[str, float] | None = None) -> LearnResult:
        """``settings.steps`` Adam steps from ``start`` (default: `initial`); returns the genome and losses."""
        began = time.perf_counter()
        values = self.initial() if start is None else torch.tensor([start[n] for n in self.names], dtype=torch.float64)
        coefficients = values.clone().to(self.device).requires_grad_(True)
        optimizer = torch.optim.Adam([coefficients], lr=self.settings.lr)
        low, high = self.bounds[:, 0].to(self.device), self.bounds[:, 1].to(self.device)
        losses, prompts = [], 0
        with torch.enable_grad(), ProgressBar("learn", self.settings.steps, enabled=progress) as bar:
            for step in range(self.settings.steps):
                optimizer.zero_grad()
                batches = self.sample()
                prompts += sum(len(batch) for batch in batches.values())
                loss = self.loss(coefficients, batches)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    coefficients.copy_(torch.minimum(torch.maximum(coefficients, low), high))
                losses.append(loss.item())
                bar.update(step + 1, f"entropy {losses[-1]:.4f}")
        genome = {name: float(v) for name, v in zip(self.names, coefficients.detach().cpu())}
        return LearnResult(genome, losses, time.perf_counter() - began, prompts)
