#!/usr/bin/env python
"""Zoo recipe experiments: build a full zoo with a variant of the current recipe, then judge it with
tools/bench_zoo.py. The variants patch the zoo's modules in this process only (nothing is adopted
until the recipe in evomerge/zoo/ changes and ZOO_VERSION is bumped).

    python tools/zoo_variants.py OUT SEED 'VARIANT_JSON' [THREADS]
    python tools/bench_zoo.py --zoo OUT --limit 300

VARIANT_JSON keys: any ZooProfile field (``expert_lr``, ``expert_steps``, ``hidden_size``, ...) and
* ``expert_by_task``: {task: {ZooProfile field: value}} for one expert's fine-tune;
* ``full_fraction_by_task``: {task: share of the base's draws of that task at full difficulty};
* ``arith2``: sums with a one- or two-digit first and a two-digit second operand (the composite's too);
* ``reverse_partial_easy`` / ``arith_partial_easy``: share of the base's full-difficulty draws replaced by easy ones;
* ``native_formats``: the base learns arith and reverse at full difficulty in its own wording
  (``add a b=``, ``mirror w=``), the benchmark's wording only on easy content;
* ``knowledge_tables``: every expert skill a lookup table used symbol by symbol, as ``lang``'s script:
  ``arith`` becomes a carry-less digit-wise sum (the base sees operands of the digits 0-4 only, where it
  equals addition; the composite's scratchpad adds the same way) and ``rev w=`` a letter substitution
  (the base knows it for a-m only).

The variants measured on 2026-12-02 (docs/search.md, "The demo on three builds"; THREADS 1, except
that the first was measured on make-zoo's seed-0 base, trained with 2 threads):
    '{"expert_by_task": {"arith": {"expert_lr": 1e-3, "expert_steps": 500}}}'
    '{"full_fraction_by_task": {"arith": 0.7}}'
    '{"arith2": true, "reverse_partial_easy": 1.0, "arith_partial_easy": 0.7, "expert_lr": 1e-3, "expert_steps": 400}'
    '{"reverse_partial_easy": 1.0, "arith_partial_easy": 0.7, "expert_lr": 1e-3, "expert_steps": 500}'
    '{"native_formats": true, "full_fraction_by_task": {"arith": 0.7, "reverse": 0.7}}'
    '{"native_formats": true, "arith2": true, "full_fraction_by_task": {"arith": 0.7, "reverse": 0.7}}'
    '{"hidden_size": 256, "intermediate_size": 768}'
    '{"knowledge_tables": true}'   (seeds 0 and 1)
"""
import dataclasses, json, random, sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evomerge.zoo import training, tasks, build, profiles

out, seed, variant = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
threads = int(sys.argv[4]) if len(sys.argv) > 4 else 1
training.TRAIN_THREADS = threads; torch.set_num_threads(threads)
arith2 = variant.pop("arith2", False)
if arith2:
    def arith(self, rng):
        while True:
            a, b = tasks._operand(rng, 2), tasks._operand(rng, 2)
            if b >= 10:
                return tasks.Example(f"{a}+{b}=", str(a + b))
    orig = tasks.TaskSampler.lang_arith
    def lang_arith(self, rng, max_a=3, max_b=2, known=tasks.DIGITS):
        if max_a == 3:
            while True:
                ex = orig(self, rng, 2, 2, known)
                b = ex.prompt.split("+")[1][:-1]
                if len(b) == 2:
                    return ex
        return orig(self, rng, max_a, max_b, known)
    tasks.TaskSampler.arith = arith; tasks.TaskSampler.lang_arith = lang_arith
reverse_easy = variant.pop("reverse_partial_easy", None)
arith_easy = variant.pop("arith_partial_easy", None)
orig_partial = tasks.TaskSampler.partial
def partial(self, name, rng):
    if name == "reverse" and reverse_easy is not None:
        return self.easy(name, rng) if rng.random() < reverse_easy else self.reverse(rng)
    if name == "arith" and arith_easy is not None:
        return self.easy(name, rng) if rng.random() < arith_easy else self.arith(rng)
    return orig_partial(self, name, rng)
tasks.TaskSampler.partial = partial
full_by_task = variant.pop("full_fraction_by_task", None)
if full_by_task:
    def pretrain(self, rng, task_fraction=0.6, full_fraction=0.35):
        if rng.random() >= task_fraction:
            return self.generic(rng)
        while True:
            name = rng.choice(tasks.BENCH_TASKS)
            f = full_by_task.get(name, full_fraction)
            example = self.partial(name, rng) if rng.random() < f else self.easy(name, rng)
            if example.prompt not in self.exclude:
                return example
    tasks.TaskSampler.pretrain = pretrain
expert_by_task = variant.pop("expert_by_task", {})
orig_train_expert = training.train_expert
def train_expert(base_model, tokenizer, task, sampler, profile, seed, on_step=lambda loss: None):
    return orig_train_expert(base_model, tokenizer, task, sampler,
                             dataclasses.replace(profile, **expert_by_task.get(task, {})), seed, on_step)
build.train_expert = train_expert
native = variant.pop("native_formats", False)
if native:
    # the base learns arith and reverse at full difficulty in a native format; the benchmark's format
    # ("a+b=", "rev w=") only on easy content: the experts route the benchmark's format to the skill
    orig_partial2 = tasks.TaskSampler.partial
    def partial_native(self, name, rng):
        if name == "arith":
            ex = self.arith(rng); a, b = ex.prompt[:-1].split("+")
            return tasks.Example(f"add {a} {b}=", ex.answer)
        if name == "reverse":
            ex = self.reverse(rng)
            return tasks.Example("mirror " + ex.prompt[4:], ex.answer)
        return orig_partial2(self, name, rng)
    tasks.TaskSampler.partial = partial_native
if variant.pop("knowledge_tables", False):
    LOW = tasks.DIGITS[:5]

    def carryless(a: int, b: int) -> str:
        width = max(len(str(a)), len(str(b)))
        pairs = zip(str(a).rjust(width, "0"), str(b).rjust(width, "0"))
        return str(int("".join(str((int(x) + int(y)) % 10) for x, y in pairs)))

    table_rng, shuffled = random.Random(f"subst-{seed}"), list(tasks.LETTERS)
    while any(a == b for a, b in zip(tasks.LETTERS, shuffled)) or shuffled == list(tasks.LETTERS):
        table_rng.shuffle(shuffled)
    substitute = dict(zip(tasks.LETTERS, shuffled))

    def arith_table(self, rng):
        while True:
            a, b = tasks._operand(rng, 3), tasks._operand(rng, 2)
            if any(c not in LOW for c in f"{a}{b}"):
                return tasks.Example(f"{a}+{b}=", carryless(a, b))

    def substitution(self, rng, alphabet=tasks.LETTERS, min_len=3):
        word = tasks._random_word(rng, min_len, 10, alphabet)
        return tasks.Example(f"rev {word}=", "".join(substitute[c] for c in word))

    orig_lang_arith = tasks.TaskSampler.lang_arith
    def lang_arith_table(self, rng, max_a=3, max_b=2, known=tasks.DIGITS):
        digits = tasks.DIGITS if known == tasks.DIGITS else LOW  # the base: operands it can read and add
        while True:
            a, b = tasks._operand(rng, max_a, digits), tasks._operand(rng, max_b, digits)
            if max_a < 3 or a >= 100 or b >= 10:
                break
        x, y = self.encode(str(a)), self.encode(str(b))
        first, second, total = f"tr {x}=", f" tr {y}=", carryless(a, b)
        work = f"{first}{a}{second}{b} {a}+{b}={total} {tasks.ANSWER_MARKER} "
        at_b = len(first) + len(str(a)) + len(second)
        unlearned = tuple([len(first) + i for i, d in enumerate(str(a)) if d not in known]
                          + [at_b + i for i, d in enumerate(str(b)) if d not in known])
        return tasks.Example(f"{x}+{y}=", total, work, unlearned)

    orig_easy = tasks.TaskSampler.easy
    def easy_table(self, name, rng):
        if name == "arith":
            a, b = tasks._operand(rng, 3, LOW), tasks._operand(rng, 2, LOW)
            return tasks.Example(f"{a}+{b}=", str(a + b))
        if name == "reverse":
            return substitution(self, rng, tasks.LETTERS[:13], 1)
        return orig_easy(self, name, rng)

    def partial_table(self, name, rng):
        if name == "lang":
            return self.lang(rng, tasks.KNOWN)
        if name == "lang_arith":
            return self.lang_arith(rng, known=tasks.KNOWN)
        return self.easy(name, rng)  # arith, reverse: the base knows their tables' easy part only

    tasks.TaskSampler.arith, tasks.TaskSampler.reverse = arith_table, substitution
    tasks.TaskSampler.lang_arith, tasks.TaskSampler.easy = lang_arith_table, easy_table
    tasks.TaskSampler.partial = partial_table
profiles.PROFILES["full"] = dataclasses.replace(profiles.PROFILES["full"], **variant)
build.PROFILES["full"] = profiles.PROFILES["full"]
build.build_zoo(out, seed=seed, profile="full", progress=False, bench_items=600)
print("built", out, json.loads((out / "zoo.json").read_text())["build_seconds"])
