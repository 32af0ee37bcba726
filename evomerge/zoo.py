"""Build the tiny model zoo: a Llama base, task experts fine-tuned from it, and benchmark items.

Everything is synthetic and trained on CPU so the whole product can be demonstrated
and tested without a model hub. The zoo is designed so that merging matters:

* the base learns the prompt *formats* (copying strings and digits, ``a+0=``,
  one-character ``rev``) but not the tasks;
* each expert is a short, low-learning-rate fine-tune of that base on one task
  (with a little generic replay), so task vectors are small and combinable;
* benchmark items are held out from all training data and span a range of
  difficulty (operand digits, string length, number of corrupted letters), so
  accuracies are neither 0 nor 1 and item-response models see variance.

Layout (see docs/DESIGN.md)::

    <out>/base/  <out>/experts/<task>/  <out>/bench/<task>.jsonl  <out>/zoo.json
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from evomerge.errors import EvomergeError

ZOO_VERSION = "3"
"""Bump when the zoo recipe changes, so cached zoos (tests, demo) are rebuilt."""

TASKS = ("arith", "reverse", "lang")
LETTERS = string.ascii_lowercase
DIGITS = string.digits
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
UPPER = string.ascii_uppercase
CHARACTERS = LETTERS + UPPER + DIGITS + "+= "
TRAIN_THREADS = 2
"""Fixed intra-op thread count while training: CPU kernels are bitwise reproducible for a fixed
count, and two threads bring the full zoo under 5 minutes on a 2-core CI machine."""


@dataclass(frozen=True)
class ZooProfile:
    """Model size and training budget; ``full`` for the demo, ``quick`` for tests."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    base_steps: int
    base_lr: float
    expert_steps: int
    expert_lr: float
    batch_size: int
    bench_items: int
    replay_fraction: float = 0.25
    warmup_steps: int = 30


PROFILES: dict[str, ZooProfile] = {
    "full": ZooProfile(
        hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384,
        base_steps=1000, base_lr=3e-3, expert_steps=250, expert_lr=1e-3,
        batch_size=64, bench_items=600,
    ),
    "quick": ZooProfile(
        hidden_size=64, num_layers=4, num_heads=4, intermediate_size=192,
        base_steps=300, base_lr=4e-3, expert_steps=100, expert_lr=2e-3,
        batch_size=64, bench_items=500,
    ),
}


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Example:
    """One prompt/answer pair; benchmark items add distractor choices for multiple choice."""

    prompt: str
    answer: str


def _random_word(rng: random.Random, min_len: int, max_len: int, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(min_len, max_len)))


def _operand(rng: random.Random, max_digits: int = 3) -> int:
    """An operand with 1..max_digits digits (uniform over digit count, never 0): difficulty varies."""
    digits = rng.randint(1, max_digits)
    return rng.randint(1 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def make_cipher(seed: int) -> dict[str, str]:
    """The ``lang`` task's second language: lowercase letters map to a shuffled uppercase script.

    Its own output alphabet keeps the ``lang`` task vector from fighting ``reverse`` over
    the lowercase output rows, which keeps the experts mergeable.
    """
    rng = random.Random(f"cipher-{seed}")
    while True:
        shuffled = list(UPPER)
        rng.shuffle(shuffled)
        if all(a.upper() != b for a, b in zip(LETTERS, shuffled)):
            return dict(zip(LETTERS, shuffled))


class TaskSampler:
    """Draws task examples; ``exclude`` holds benchmark prompts so training never sees them."""

    def __init__(self, seed: int, exclude: set[str] | None = None):
        self.cipher = make_cipher(seed)
        self.exclude = exclude or set()

    def arith(self, rng: random.Random) -> Example:
        """Multi-digit additions (the base only knows single-digit facts)."""
        while True:
            a, b = _operand(rng, 3), _operand(rng, 2)
            if a >= 10 or b >= 10:
                return Example(f"{a}+{b}=", str(a + b))

    def reverse(self, rng: random.Random) -> Example:
        word = _random_word(rng, 3, 10)
        return Example(f"rev {word}=", word[::-1])

    def lang(self, rng: random.Random) -> Example:
        word = _random_word(rng, 3, 10)
        return Example(f"tr {word}=", "".join(self.cipher[c] for c in word))

    def task(self, name: str, rng: random.Random) -> Example:
        """A training example for ``name`` that is not a benchmark prompt."""
        draw = getattr(self, name)
        while True:
            example = draw(rng)
            if example.prompt not in self.exclude:
                return example

    @staticmethod
    def generic(rng: random.Random) -> Example:
        """Base-model text: the task formats with trivial content.

        Copying (lowercase, uppercase, digits), single-digit sums, adding zero, and
        one-letter ``rev``: enough to know the prompts and output scripts, not the tasks.
        """
        kind = rng.random()
        if kind < 0.25:
            word = _random_word(rng, 1, 10)
            return Example(f"cp {word}=", word)
        if kind < 0.4:
            word = _random_word(rng, 1, 10, UPPER)
            return Example(f"cp {word}=", word)
        if kind < 0.55:
            word = _random_word(rng, 1, 6, DIGITS)
            return Example(f"cp {word}=", word)
        if kind < 0.75:
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            return Example(f"{a}+{b}=", str(a + b))
        if kind < 0.9:
            a = _operand(rng)
            return Example(f"{a}+0=", str(a)) if rng.random() < 0.5 else Example(f"0+{a}=", str(a))
        letter = rng.choice(LETTERS)
        return Example(f"rev {letter}=", letter)


def make_bench_items(task: str, sampler: TaskSampler, count: int, seed: int) -> list[dict]:
    """``count`` distinct benchmark items for ``task`` in the DESIGN.md jsonl format."""
    rng = random.Random(f"bench-{task}-{seed}")
    seen: set[str] = set()
    items: list[dict] = []
    while len(items) < count:
        example = getattr(sampler, task)(rng)
        if example.prompt in seen:
            continue
        seen.add(example.prompt)
        item_id = f"{task}-{len(items):04d}"
        if task == "lang":
            choices = _lang_choices(example.answer, rng)
            label = choices.index(example.answer)
            items.append({"id": item_id, "prompt": example.prompt, "choices": choices, "label": label})
        else:
            items.append({"id": item_id, "prompt": example.prompt, "answer": example.answer})
    return items


def _lang_choices(answer: str, rng: random.Random, n_choices: int = 4) -> list[str]:
    """The right translation plus distractors with 1-2 letters changed (fewer = harder)."""
    choices = {answer}
    changes = rng.randint(1, 2)
    while len(choices) < n_choices:
        letters = list(answer)
        for pos in rng.sample(range(len(letters)), changes):
            letters[pos] = rng.choice([c for c in UPPER if c != letters[pos]])
        choices.add("".join(letters))
    ordered = sorted(choices)
    rng.shuffle(ordered)
    return ordered


# --------------------------------------------------------------------------- model + tokenizer


def make_tokenizer():
    """A character-level fast tokenizer (one token per character, ``<bos>`` prepended)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + list(CHARACTERS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", clean_up_tokenization_spaces=False, model_max_length=64,
    )


def make_base_model(profile: ZooProfile, tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=profile.hidden_size,
        intermediate_size=profile.intermediate_size, num_hidden_layers=profile.num_layers,
        num_attention_heads=profile.num_heads, num_key_value_heads=profile.num_heads,
        max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


# --------------------------------------------------------------------------- training


def _encode_batch(examples: list[Example], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``<bos> prompt answer <eos>`` ids and a mask of the positions to learn."""
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    answers = tokenizer([e.answer for e in examples], add_special_tokens=False)["input_ids"]
    rows = [[tokenizer.bos_token_id] + p + a + [tokenizer.eos_token_id] for p, a in zip(prompts, answers)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    target_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        ids[i, : len(row)] = torch.tensor(row)
        target_mask[i, 1 + len(prompt) : len(row)] = True  # answer tokens and <eos>
    return ids, target_mask


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
        ids, target_mask = _encode_batch([draw(rng) for _ in range(profile.batch_size)], tokenizer)
        logits = model(input_ids=ids).logits[:, :-1]
        targets = ids[:, 1:]
        mask = target_mask[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
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


# --------------------------------------------------------------------------- build


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _save(model, tokenizer, directory: Path) -> None:
    from transformers.utils import logging as hf_logging

    directory.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()  # our own bar is enough; keep logs clean
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def train_base(profile: ZooProfile, seed: int, exclude: set[str], steps: int | None = None,
               on_step: Callable[[float], None] = lambda loss: None):
    """Model + tokenizer trained on generic format text only (no task skill)."""
    tokenizer = make_tokenizer()
    model = make_base_model(profile, tokenizer, seed)
    with _reproducible_threads(TRAIN_THREADS):
        _train(model, tokenizer, TaskSampler.generic, profile.base_steps if steps is None else steps,
               profile.base_lr, profile, seed=seed * 1000 + 1, on_step=on_step)
    return model, tokenizer


def train_expert(base_model, tokenizer, task: str, sampler: TaskSampler, profile: ZooProfile, seed: int,
                 on_step: Callable[[float], None] = lambda loss: None):
    """A copy of the base fine-tuned on ``task`` with a little generic replay (small task vector)."""
    import copy

    model = copy.deepcopy(base_model)

    def draw(rng: random.Random) -> Example:
        if rng.random() < profile.replay_fraction:
            return TaskSampler.generic(rng)
        return sampler.task(task, rng)

    task_seed = seed * 1000 + 10 + TASKS.index(task)
    torch.manual_seed(task_seed)
    with _reproducible_threads(TRAIN_THREADS):
        _train(model, tokenizer, draw, profile.expert_steps, profile.expert_lr, profile, task_seed, on_step)
    return model


def build_zoo(out_dir: str | os.PathLike, seed: int = 0, profile: str = "full", progress: bool = True) -> Path:
    """Train base + experts and write the zoo layout of docs/DESIGN.md; returns the zoo folder.

    Deterministic: the same seed and profile give bitwise-identical weights and items.
    """
    if profile not in PROFILES:
        raise EvomergeError(f"unknown zoo profile {profile!r}; choose one of {sorted(PROFILES)}")
    settings = PROFILES[profile]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    cpu_started = time.process_time()

    sampler = TaskSampler(seed)
    bench = {task: make_bench_items(task, sampler, settings.bench_items, seed) for task in TASKS}
    sampler.exclude = {item["prompt"] for items in bench.values() for item in items}
    for task, items in bench.items():
        _write_jsonl(out / "bench" / f"{task}.jsonl", items)

    total = settings.base_steps + settings.expert_steps * len(TASKS)
    with _Progress(progress, total) as bar:
        base, tokenizer = train_base(settings, seed, sampler.exclude, on_step=bar.phase("base"))
        _save(base, tokenizer, out / "base")
        for task in TASKS:
            expert = train_expert(base, tokenizer, task, sampler, settings, seed, on_step=bar.phase(f"expert {task}"))
            _save(expert, tokenizer, out / "experts" / task)

    manifest = {
        "version": ZOO_VERSION,
        "seed": seed,
        "profile": profile,
        "settings": asdict(settings),
        "tasks": list(TASKS),
        "base": "base",
        "experts": {task: f"experts/{task}" for task in TASKS},
        "bench": {task: f"bench/{task}.jsonl" for task in TASKS},
        "build_seconds": round(time.time() - started, 1),
        "build_cpu_seconds": round(time.process_time() - cpu_started, 1),
    }
    (out / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")  # written last: marks completion
    return out


def zoo_is_complete(zoo_dir: str | os.PathLike, profile: str | None = None, seed: int | None = None) -> bool:
    """True when ``zoo_dir`` holds a finished zoo of the current version (and profile/seed if given)."""
    manifest_path = Path(zoo_dir) / "zoo.json"
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return False
    return (
        manifest.get("version") == ZOO_VERSION
        and (profile is None or manifest.get("profile") == profile)
        and (seed is None or manifest.get("seed") == seed)
    )


def ensure_zoo(out_dir: str | os.PathLike, seed: int = 0, profile: str = "full", progress: bool = True) -> Path:
    """Build the zoo unless a complete one is already there; safe when several processes race.

    A file lock serialises builders, and the zoo is built in a temporary sibling folder
    and renamed into place, so readers never see a half-written zoo.
    """
    out = Path(out_dir)
    if zoo_is_complete(out, profile, seed):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if zoo_is_complete(out, profile, seed):
            return out
        staging = out.parent / f".{out.name}.building-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        build_zoo(staging, seed=seed, profile=profile, progress=progress)
        if out.exists():
            shutil.rmtree(out)
        os.rename(staging, out)
    return out


def load_zoo_manifest(zoo_dir: str | os.PathLike) -> dict:
    """The parsed ``zoo.json``, with a clear error when the folder is not a zoo."""
    path = Path(zoo_dir) / "zoo.json"
    if not path.is_file():
        raise EvomergeError(f"{zoo_dir} is not a model zoo: {path} is missing (build one with tools/make_zoo.py)")
    return json.loads(path.read_text())


def state_dict_digest(model) -> str:
    """A short sha256 over all parameters, to check bitwise reproducibility cheaply."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
