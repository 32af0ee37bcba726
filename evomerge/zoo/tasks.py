"""The zoo's synthetic tasks: training draws (full and easy) and held-out benchmark items.

Three expert skills and one composite task that needs two of them at once:

* ``arith``: ``347+85=`` -> ``432`` (exact match);
* ``reverse``: ``rev word=`` -> ``drow`` (exact match);
* ``lang``: reading the synthetic language, ``tr QXK=`` -> ``b4e`` (multiple choice): its
  script writes 16 letters and the 10 digits with 26 uppercase symbols;
* ``lang_arith``: arithmetic written in the synthetic language, answered by generation with a
  short scratchpad that reads each operand, adds, then says ``Answer: N``
  (``QX+BD=`` -> ``tr QX=46 tr BD=12 46+12=58 Answer: 58``). No expert is trained on it.

The base learns every format on easy content (short operands, short words, half of the
synthetic script); each expert extends one skill to the full difficulty. So the composite task
needs the ``arith`` expert's long sums and the ``lang`` expert's other half of the script:
a merge can solve it, no single expert can.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

EXPERT_TASKS = ("arith", "reverse", "lang")
COMPOSITE_TASKS = ("lang_arith",)
TASKS = EXPERT_TASKS
"""The tasks that have an expert (the manifest's ``tasks``)."""
BENCH_TASKS = EXPERT_TASKS + COMPOSITE_TASKS
"""Every benchmark of the zoo: the experts' tasks and the composite one."""
LETTERS = string.ascii_lowercase
DIGITS = string.digits
UPPER = string.ascii_uppercase
ENGLISH = LETTERS[:16] + DIGITS
"""What the synthetic language writes: 16 letters and the digits, one uppercase symbol each."""
KNOWN = LETTERS[:8] + DIGITS[:5]
"""The half of the synthetic script the base model learns (``lang`` expert: all of it)."""
ANSWER_MARKER = "Answer:"

BENCHMARK_OPTIONS = {
    "lang_arith": {"scoring": "generate", "max_new_tokens": 48, "extract": {"after": ANSWER_MARKER},
                   "compare": "numeric"},
}
"""Search-space benchmark keys per task, beyond name and path (docs/estimate.md); the manifest
carries them so spaces and tools know how to score each task."""
MAX_BENCH_ITEMS = 5000
"""Training never sees the prompts of this many benchmark items per task, whatever the benchmark size
written: a zoo with 600 items and one with 5,000 have the same weights and share their first 600 items."""


@dataclass(frozen=True)
class Example:
    """One prompt/answer pair; ``work`` is the scratchpad written before the answer (if any)."""

    prompt: str
    answer: str
    work: str = ""
    unlearned: tuple[int, ...] = ()  # completion characters training does not learn (teacher-forced only)

    @property
    def completion(self) -> str:
        """What a model writes after the prompt: the scratchpad, then the answer."""
        return self.work + self.answer


def _random_word(rng: random.Random, min_len: int, max_len: int, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(min_len, max_len)))


def _operand(rng: random.Random, max_digits: int = 3, digits: str = DIGITS) -> int:
    """An operand with 1..max_digits digits drawn from ``digits`` (uniform over digit count, never 0)."""
    n = rng.randint(1, max_digits)
    while True:
        text = "".join(rng.choice(digits) for _ in range(n))
        if text[0] != "0":
            return int(text)


def make_cipher(seed: int) -> dict[str, str]:
    """The synthetic language's script: each character of ``ENGLISH`` has its own uppercase symbol."""
    rng = random.Random(f"cipher-{seed}")
    while True:
        shuffled = list(UPPER)
        rng.shuffle(shuffled)
        if all(a.upper() != b for a, b in zip(ENGLISH, shuffled)):
            return dict(zip(ENGLISH, shuffled))


class TaskSampler:
    """Draws task examples; ``exclude`` holds benchmark prompts so training never sees them."""

    def __init__(self, seed: int, exclude: set[str] | None = None):
        self.cipher = make_cipher(seed)
        self.exclude = exclude or set()

    def encode(self, text: str) -> str:
        return "".join(self.cipher[c] for c in text)

    # ---- full difficulty: the experts' training data and the benchmarks

    def arith(self, rng: random.Random) -> Example:
        while True:
            a, b = _operand(rng, 3), _operand(rng, 2)
            if a >= 100 or b >= 10:  # never the base's easy sums (a < 100, b < 10)
                return Example(f"{a}+{b}=", str(a + b))

    def reverse(self, rng: random.Random) -> Example:
        word = _random_word(rng, 3, 10)
        return Example(f"rev {word}=", word[::-1])

    def lang(self, rng: random.Random, alphabet: str = ENGLISH, min_len: int = 3) -> Example:
        word = _random_word(rng, min_len, 8, alphabet)
        return Example(f"tr {self.encode(word)}=", word)

    def lang_arith(self, rng: random.Random, max_a: int = 3, max_b: int = 2, known: str = DIGITS) -> Example:
        """``known``: the digits whose symbols the model learns to read here; reading the others is
        left unlearned (the base has seen them in questions, never what they mean)."""
        while True:
            a, b = _operand(rng, max_a), _operand(rng, max_b)
            if max_a < 3 or a >= 100 or b >= 10:
                break
        x, y = self.encode(str(a)), self.encode(str(b))
        first, second = f"tr {x}=", f" tr {y}="
        work = f"{first}{a}{second}{b} {a}+{b}={a + b} {ANSWER_MARKER} "
        at_b = len(first) + len(str(a)) + len(second)
        unlearned = tuple([len(first) + i for i, d in enumerate(str(a)) if d not in known]
                          + [at_b + i for i, d in enumerate(str(b)) if d not in known])
        return Example(f"{x}+{y}=", str(a + b), work, unlearned)

    def task(self, name: str, rng: random.Random) -> Example:
        """A training example for ``name`` that is not a benchmark prompt."""
        draw = getattr(self, name)
        while True:
            example = draw(rng)
            if example.prompt not in self.exclude:
                return example

    # ---- the base model's text: every format, easy content

    def easy(self, name: str, rng: random.Random) -> Example:
        """``name``'s format on content the base learns: short sums, short words, half the script."""
        if name == "arith":
            a, b = rng.randint(0, 99), rng.randint(0, 9)
            return Example(f"{a}+{b}=", str(a + b))
        if name == "reverse":
            word = _random_word(rng, 1, 5)
            return Example(f"rev {word}=", word[::-1])
        if name == "lang":
            return self.lang(rng, KNOWN, min_len=1)
        return self.lang_arith(rng, max_a=2, max_b=1, known=KNOWN)

    def partial(self, name: str, rng: random.Random) -> Example:
        """``name`` at full difficulty as far as the base may know it (the synthetic language's known
        half only), so experts amplify skills the base has begun rather than create new ones."""
        if name == "lang":
            return self.lang(rng, KNOWN)
        if name == "lang_arith":
            return self.lang_arith(rng, known=KNOWN)
        if name == "reverse" and rng.random() < 0.6:  # the base is quick to learn reversing: less of it
            return self.easy(name, rng)
        return getattr(self, name)(rng)

    def pretrain(self, rng: random.Random, task_fraction: float = 0.6, full_fraction: float = 0.35) -> Example:
        """The base's broad mixture: generic text, and every task's format, mostly on easy content
        (``easy``), sometimes at full difficulty on what the base may know (``partial``)."""
        if rng.random() >= task_fraction:
            return self.generic(rng)
        while True:
            name = rng.choice(BENCH_TASKS)
            example = self.partial(name, rng) if rng.random() < full_fraction else self.easy(name, rng)
            if example.prompt not in self.exclude:
                return example

    @staticmethod
    def generic(rng: random.Random) -> Example:
        """Copying (lowercase, uppercase, digits) and adding zero: the scripts and the ``=`` convention."""
        kind = rng.random()
        if kind < 0.3:
            word = _random_word(rng, 1, 10)
            return Example(f"cp {word}=", word)
        if kind < 0.5:
            word = _random_word(rng, 1, 10, UPPER)
            return Example(f"cp {word}=", word)
        if kind < 0.75:
            word = _random_word(rng, 1, 6, DIGITS)
            return Example(f"cp {word}=", word)
        a = _operand(rng)
        return Example(f"{a}+0=", str(a)) if rng.random() < 0.5 else Example(f"0+{a}=", str(a))


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
        item_id = f"{task}-{len(items):0{max(4, len(str(count - 1)))}d}"
        if task == "lang":
            choices = _lang_choices(example.answer, rng)
            label = choices.index(example.answer)
            items.append({"id": item_id, "prompt": example.prompt, "choices": choices, "label": label})
        else:
            items.append({"id": item_id, "prompt": example.prompt, "answer": example.answer})
    return items


def _lang_choices(answer: str, rng: random.Random, n_choices: int = 4) -> list[str]:
    """The right reading plus distractors with 1-2 characters changed (fewer = harder)."""
    return near_miss_choices(list(answer), ENGLISH, rng, n_choices)


def near_miss_choices(symbols: list[str], alphabet: str, rng: random.Random, n_choices: int = 4,
                      sep: str = "") -> list[str]:
    """Multiple-choice options: ``sep.join(symbols)`` plus distractors with the same 1-2 symbols
    changed to others of ``alphabet`` (near misses, so the choice needs the skill), shuffled."""
    answer = sep.join(symbols)
    choices = {answer}
    changes = min(rng.randint(1, 2), len(symbols))
    while len(choices) < n_choices:
        wrong = list(symbols)
        for pos in rng.sample(range(len(wrong)), changes):
            wrong[pos] = rng.choice([c for c in alphabet if c != wrong[pos]])
        choices.add(sep.join(wrong))
    ordered = sorted(choices)
    rng.shuffle(ordered)
    return ordered
