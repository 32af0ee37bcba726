"""The zoo's synthetic tasks: training draws (full and easy) and held-out benchmark items.

Three expert skills, each a table of facts used symbol by symbol (as real fine-tunes mostly add
knowledge to what a strong base can already do), and one composite task that needs two of them:

* ``arith``: carry-less sums, each column added mod 10 (``347+85=`` -> ``322``), multiple choice:
  the base knows the sums of the digits 0-4 (where carry-less addition is addition), the expert
  the whole table;
* ``cipher``: a secret letter substitution, ``enc word=`` -> ``xbpi``, multiple choice: the base
  knows it for the letters a-m, the expert for all 26;
* ``lang``: reading the synthetic language, ``tr QXK=`` -> ``b4e`` (multiple choice): its
  script writes 16 letters and the 10 digits with 26 uppercase symbols; the base reads half;
* ``lang_arith``: carry-less arithmetic written in the synthetic language, answered by generation
  with a short scratchpad that reads each operand, adds, then says ``Answer: N``
  (``QX+BD=`` -> ``tr QX=46 tr BD=12 46+12=58 Answer: 58``). No expert is trained on it.

Multiple-choice items offer the right answer and near misses (1-2 symbols changed), so a model
that knows most of a table scores most of its items, as on real multiple-choice benchmarks. The
composite needs the ``arith`` expert's half of the table and a merge writes its scratchpad best.
It was meant to need the ``lang`` expert's half of the script too, but the base learns to read the
script's digits from the scratchpad itself (restating ``a+b=`` after each reading teaches what an
unlearned reading said); masking the restatement as well left a composite no model could
solve at this size (docs/search.md, "Zoo v5").
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

EXPERT_TASKS = ("arith", "cipher", "lang")
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
KNOWN_DIGITS = DIGITS[:5]
"""The digits whose carry-less sums the base learns (``arith`` expert: all of them)."""
KNOWN_LETTERS = LETTERS[:13]
"""The letters whose substitution the base learns (``cipher`` expert: all of them)."""
CHOICE_ALPHABETS = {"arith": DIGITS, "cipher": LETTERS, "lang": ENGLISH}
"""The multiple-choice tasks and the symbols their near-miss distractors are made of."""
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


def _columns(a: int, b: int) -> list[tuple[str, str]]:
    """The digit pairs of ``a + b`` written right-aligned, most significant first (short operand 0-padded)."""
    width = max(len(str(a)), len(str(b)))
    return list(zip(str(a).rjust(width, "0"), str(b).rjust(width, "0")))


def carryless_sum(a: int, b: int) -> str:
    """Each column added mod 10, no carrying (``347+85`` -> ``322``): equals ``a + b`` whenever no
    column's digits sum past 9, so on the digits 0-4 it is plain addition."""
    return str(int("".join(str((int(x) + int(y)) % 10) for x, y in _columns(a, b))))


def make_substitution(seed: int) -> dict[str, str]:
    """The ``cipher`` task's table: every lowercase letter to another one."""
    rng = random.Random(f"substitution-{seed}")
    shuffled = list(LETTERS)
    while True:
        rng.shuffle(shuffled)
        if all(a != b for a, b in zip(LETTERS, shuffled)):
            return dict(zip(LETTERS, shuffled))


def make_script(seed: int) -> dict[str, str]:
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
        self.script = make_script(seed)
        self.substitution = make_substitution(seed)
        self.exclude = exclude or set()

    def pair(self, task: str):
        """A draw of ``task`` as ``rng -> (prompt, answer)``."""
        def draw(rng: random.Random) -> tuple[str, str]:
            example = getattr(self, task)(rng)
            return example.prompt, example.answer
        return draw

    def encode(self, text: str) -> str:
        return "".join(self.script[c] for c in text)

    # ---- full difficulty: the experts' training data and the benchmarks

    def arith(self, rng: random.Random, digits: str = DIGITS) -> Example:
        while True:
            a, b = _operand(rng, 3, digits), _operand(rng, 2, digits)
            if digits != DIGITS or any(c not in KNOWN_DIGITS for c in f"{a}{b}"):  # full: beyond the base's table
                return Example(f"{a}+{b}=", carryless_sum(a, b))

    def cipher(self, rng: random.Random, alphabet: str = LETTERS, min_len: int = 3) -> Example:
        word = _random_word(rng, min_len, 10, alphabet)
        return Example(f"enc {word}=", "".join(self.substitution[c] for c in word))

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
        x, y, total = self.encode(str(a)), self.encode(str(b)), carryless_sum(a, b)
        first, second = f"tr {x}=", f" tr {y}="
        work = f"{first}{a}{second}{b} {a}+{b}={total} {ANSWER_MARKER} "
        at_b = len(first) + len(str(a)) + len(second)
        unlearned = [len(first) + i for i, d in enumerate(str(a)) if d not in known] + \
                    [at_b + i for i, d in enumerate(str(b)) if d not in known]
        # nor the sum's digits in columns where it reads an unknown digit (the arith table's other half);
        # the answer copies the sum, which is learned on every digit
        unknown = {i for i, (x_digit, y_digit) in enumerate(reversed(_columns(a, b)))  # i: from the right
                   if x_digit not in known or y_digit not in known}
        total_end = len(work) - len(f" {ANSWER_MARKER} ")
        unlearned += [total_end - 1 - i for i in range(len(total)) if i in unknown]
        return Example(f"{x}+{y}=", total, work, tuple(unlearned))

    def task(self, name: str, rng: random.Random) -> Example:
        """A training example for ``name`` that is not a benchmark prompt."""
        draw = getattr(self, name)
        while True:
            example = draw(rng)
            if example.prompt not in self.exclude:
                return example

    # ---- the base model's text: every format, easy content

    def easy(self, name: str, rng: random.Random) -> Example:
        """``name``'s format on content the base learns: half of each table, short words and sums."""
        if name == "arith":
            return self.arith(rng, KNOWN_DIGITS)
        if name == "cipher":
            return self.cipher(rng, KNOWN_LETTERS, min_len=1)
        if name == "lang":
            return self.lang(rng, KNOWN, min_len=1)
        return self.lang_arith(rng, max_a=2, max_b=1, known=KNOWN)

    def partial(self, name: str, rng: random.Random) -> Example:
        """``name`` at full difficulty as far as the base may know it (the known half of each table),
        so experts complete skills the base has begun rather than create new ones."""
        if name == "lang":
            return self.lang(rng, KNOWN)
        if name == "lang_arith":
            return self.lang_arith(rng, known=KNOWN)
        return self.easy(name, rng)

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


def distinct_draws(draw, rng: random.Random, seen: set[str]):
    """``(prompt, answer)`` draws whose prompt is new, forever (``seen`` grows with them): the loop every
    item list shares. The caller may draw from ``rng`` between two (choices), as one loop would."""
    while True:
        prompt, answer = draw(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        yield prompt, answer


def make_bench_items(task: str, sampler: TaskSampler, count: int, seed: int) -> list[dict]:
    """``count`` distinct benchmark items for ``task`` in the DESIGN.md jsonl format."""
    rng = random.Random(f"bench-{task}-{seed}")
    items: list[dict] = []
    draws = distinct_draws(sampler.pair(task), rng, set())
    while len(items) < count:
        prompt, answer = next(draws)
        item_id = f"{task}-{len(items):0{max(4, len(str(count - 1)))}d}"
        if task in CHOICE_ALPHABETS:
            choices = near_miss_choices(list(answer), CHOICE_ALPHABETS[task], rng)
            items.append({"id": item_id, "prompt": prompt, "choices": choices, "label": choices.index(answer)})
        else:
            items.append({"id": item_id, "prompt": prompt, "answer": answer})
    return items


def make_data_items(task: str, sampler: TaskSampler, count: int, seed: int, exclude: set[str]) -> list[dict]:
    """``count`` unlabelled prompts of ``task`` (choices, for multiple choice; no answer, no label), none of
    them a benchmark prompt (``exclude``): the unlabelled data data-informed merging reads."""
    rng = random.Random(f"data-{task}-{seed}")
    items: list[dict] = []
    draws = distinct_draws(sampler.pair(task), rng, set(exclude))
    while len(items) < count:
        prompt, answer = next(draws)
        item = {"id": f"{task}-data-{len(items):04d}", "prompt": prompt}
        if task in CHOICE_ALPHABETS:
            item["choices"] = near_miss_choices(list(answer), CHOICE_ALPHABETS[task], rng)
        items.append(item)
    return items


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
