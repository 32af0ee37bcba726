"""The tiny model zoo: a Llama base, task experts fine-tuned from it, and benchmark items.

Everything is synthetic and trained on CPU so the whole product can be demonstrated
and tested without a model hub. The zoo is designed so that merging matters:

* each expert skill is a table of facts used symbol by symbol (carry-less sums, a letter
  cipher, a script), as real fine-tunes mostly add knowledge to what a strong base can do;
* the base is pretrained on a broad mixture: generic text and every task's format on the half
  of each table it knows, so it has begun each skill and experts share its representations;
* each expert is a short, low-learning-rate fine-tune of that base on one task at full
  difficulty (with the base's mixture replayed), so task vectors are small and add up:
  uniform task arithmetic keeps much of each skill, as with real fine-tunes;
* a composite task (``lang_arith``: carry-less sums written in the synthetic script, answered by
  generation with a scratchpad) needs the arith expert's half of its table, and merges write its
  scratchpad better than any expert on most builds;
* benchmark items are held out from all training data and span a range of difficulty,
  so accuracies are neither 0 nor 1 and item-response models see variance.

| module | concept |
|---|---|
| `tasks.py` | the synthetic tasks: training draws and held-out benchmark items |
| `model.py` | character tokenizer and Llama architecture |
| `profiles.py` | model size and training budget per profile (`full`, `quick`) |
| `training.py` | reproducible CPU training of the base and the experts |
| `build.py` | the zoo folder and its manifest; `ensure_zoo` reuses a complete one |
| `smol.py` | the `smol` profile: SmolLM2-135M-Instruct converted from its GGUF, its tasks and fine-tuned experts |
"""

from evomerge.zoo.build import ZOO_VERSION, build_zoo, ensure_zoo, load_zoo_manifest, zoo_is_complete
from evomerge.zoo.profiles import PROFILES, ZooProfile
from evomerge.zoo.tasks import (
    BENCH_TASKS, BENCHMARK_OPTIONS, COMPOSITE_TASKS, KNOWN_DIGITS, KNOWN_LETTERS, MAX_BENCH_ITEMS, TASKS, Example,
    TaskSampler, carryless_sum, make_bench_items, make_script,
)
from evomerge.zoo.training import state_dict_digest, train_base, train_expert

__all__ = [
    "ZOO_VERSION", "build_zoo", "ensure_zoo", "load_zoo_manifest", "zoo_is_complete",
    "PROFILES", "ZooProfile", "TASKS", "BENCH_TASKS", "BENCHMARK_OPTIONS", "COMPOSITE_TASKS", "MAX_BENCH_ITEMS", "Example", "TaskSampler", "make_bench_items", "make_script",
    "KNOWN_DIGITS", "KNOWN_LETTERS", "carryless_sum",
    "state_dict_digest", "train_base", "train_expert",
]
