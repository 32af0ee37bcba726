"""The zoo's synthetic tasks: training examples, and held-out benchmark items with a spread of difficulty."""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

TASKS = ("arith", "reverse", "lang")
LETTERS = string.ascii_lowercase
DIGITS = string.digits
UPPER = string.ascii_uppercase


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

