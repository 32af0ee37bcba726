"""Training the zoo's base and experts on CPU, reproducibly (fixed thread count, seeded draws)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import random
from typing import Callable, Iterator

import torch

from evomerge.zoo.model import make_base_model, make_tokenizer
from evomerge.zoo.profiles import ZooProfile
from evomerge.zoo.tasks import TASKS, Example, TaskSampler

TRAIN_THREADS = 2
"""Fixed intra-op thread count while training: CPU kernels are bitwise reproducible for a fixed
count, and two threads bring the full zoo under 5 minutes on a 2-core CI machine."""


def _encode_batch(examples: list[Example], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``<bos> prompt completion <eos>`` ids and a mask of the positions to learn."""
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    answers = tokenizer([e.completion for e in examples], add_special_tokens=False)["input_ids"]
    rows = [[tokenizer.bos_token_id] + p + a + [tokenizer.eos_token_id] for p, a in zip(prompts, answers)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    target_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, prompt, example) in enumerate(zip(rows, prompts, examples)):
        ids[i, : len(row)] = torch.tensor(row)
        target_mask[i, 1 + len(prompt) : len(row)] = True  # completion tokens and <eos>
        for position in example.unlearned:  # one token per character
            target_mask[i, 1 + len(prompt) + position] = False
    return ids, target_mask


def _length_groups(examples: list[Example]) -> list[list[Example]]:
    """The batch in (at most) two groups by length, split where padding costs least: scratchpad
    examples are three times longer than the others and would otherwise pad every row."""
    ordered = sorted(examples, key=lambda e: len(e.prompt) + len(e.completion))
    lengths = [len(e.prompt) + len(e.completion) for e in ordered]
    n = len(ordered)
    cost = {i: i * lengths[i - 1] + (n - i) * lengths[-1] for i in range(1, n)}
    split = min(cost, key=cost.get, default=n)
    if not cost or cost[split] >= n * lengths[-1]:
        return [ordered]
    return [ordered[:split], ordered[split:]]


def _train(model, tokenizer, draw: Callable[[random.Random], Example], steps: int, lr: float,
           profile: ZooProfile, seed: int, on_step: Callable[[float], None]) -> float:
    """AdamW with warmup + cosine decay; loss only on answers, so capacity goes to the skill."""
    rng = random.Random(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = min(profile.warmup_steps, max(1, steps // 5))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    loss_value = float("nan")
    for _ in range(steps):
        groups = [_encode_batch(group, tokenizer) for group in _length_groups([draw(rng) for _ in range(profile.batch_size)])]
        n_targets = sum(int(mask[:, 1:].sum()) for _, mask in groups)
        loss_value = 0.0
        for ids, target_mask in groups:  # one token-weighted mean over the whole batch
            logits = model(input_ids=ids).logits[:, :-1]
            mask = target_mask[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[mask], ids[:, 1:][mask], reduction="sum") / n_targets
            loss.backward()
            loss_value += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        on_step(loss_value)
    model.eval()
    return loss_value


@contextlib.contextmanager
def _reproducible_threads(threads: int) -> Iterator[None]:
    """Pin the intra-op thread count (results depend on it) and restore it afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _Progress:
    """A rich progress bar over all training steps, or a no-op when ``enabled`` is false."""

    def __init__(self, enabled: bool, total: int):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn())
            self.task = self.bar.add_task("zoo", total=total, loss=float("nan"))

    def __enter__(self) -> "_Progress":
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.__exit__(*exc)

    def phase(self, description: str) -> Callable[[float], None]:
        if self.bar:
            self.bar.update(self.task, description=description)

        def on_step(loss: float) -> None:
            if self.bar:
                self.bar.update(self.task, advance=1, loss=loss)

        return on_step



def train_base(profile: ZooProfile, seed: int, exclude: set[str], steps: int | None = None,
               on_step: Callable[[float], None] = lambda loss: None):
    """Model + tokenizer pretrained on the broad mixture: generic text and every task's format on
    easy content (``TaskSampler.pretrain``), never on a benchmark prompt."""
    tokenizer = make_tokenizer()
    model = make_base_model(profile, tokenizer, seed)
    sampler = TaskSampler(seed, exclude)

    def draw(rng: random.Random) -> Example:
        return sampler.pretrain(rng, profile.pretrain_task_fraction, profile.pretrain_full_fraction)

    with _reproducible_threads(TRAIN_THREADS):
        _train(model, tokenizer, draw, profile.base_steps if steps is None else steps,
               profile.base_lr, profile, seed=seed * 1000 + 1, on_step=on_step)
    return model, tokenizer


def train_expert(base_model, tokenizer, task: str, sampler: TaskSampler, profile: ZooProfile, seed: int,
                 on_step: Callable[[float], None] = lambda loss: None):
    """A copy of the base briefly fine-tuned, at a low learning rate, on ``task`` at full difficulty,
    with some of the base's own mixture replayed: a small task vector that adds up with the others."""
    model = copy.deepcopy(base_model)

    def draw(rng: random.Random) -> Example:
        if rng.random() < profile.replay_fraction:
            return sampler.pretrain(rng, profile.pretrain_task_fraction, profile.pretrain_full_fraction)
        return sampler.task(task, rng)

    task_seed = seed * 1000 + 10 + TASKS.index(task)
    torch.manual_seed(task_seed)
    with _reproducible_threads(TRAIN_THREADS):
        _train(model, tokenizer, draw, profile.expert_steps, profile.expert_lr, profile, task_seed, on_step)
    return model



def state_dict_digest(model) -> str:
    """A short sha256 over all parameters, to check bitwise reproducibility cheaply."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
