"""Benchmarks: items read from local data, and per-item scoring of a causal LM.

| module | concept |
|---|---|
| `items.py` | `Item`, `Benchmark`, `Prompting` (few-shot examples, chat template, delimiter) |
| `loading.py` | files, folders, datasets, hub ids; column mapping, templates, splits, few-shot draws; entry options checked |
| `hub.py` | datasets named by hub id (``openai/gsm8k``): ``load_dataset``, the local caches offline |
| `lmeval/` | lm-evaluation-harness tasks as benchmarks: lm-eval's prompts and metrics, the in-memory model's answers |
| `presets.py` | gsm8k, mgsm, arc, mmlu, hellaswag: entry settings for each dataset's own columns |
| `kinds/` | item kinds behind a registry: exact_match, multiple_choice, generate, lm_eval_* (one module each) |
| `answers.py` | answer extractors (last_number, gsm8k, regex, after) and comparisons (string, numeric) |
| `prompts.py` | an item's full prompt (few-shot, chat template) as token ids |
| `generation.py` | batched greedy generation: KV cache, left padding, length buckets, stop strings |
| `scoring.py` | `score_items` / `score_records` (per-item jsonl records), `accuracy` |

Scores are per item (correct / wrong) because the IRT estimator needs the full
responses matrix, not just accuracies.
"""

from evomerge.benchmarks.generation import Generation, generate_greedy
from evomerge.benchmarks.hub import is_hub_id
from evomerge.benchmarks.items import EXACT_MATCH, GENERATE, MULTIPLE_CHOICE, Benchmark, Item, Prompting, Shot
from evomerge.benchmarks.kinds import KINDS, GenerateSettings, Scored, get_kind
from evomerge.benchmarks.lmeval import LM_EVAL_VERSION, LmEvalTask
from evomerge.benchmarks.loading import BenchmarkFormat, check_format, load_benchmark, load_prompts, option_keys
from evomerge.benchmarks.presets import PRESETS
from evomerge.benchmarks.scoring import accuracy, greedy_generate, score_items, score_records, write_records

__all__ = [
    "EXACT_MATCH", "GENERATE", "MULTIPLE_CHOICE", "KINDS", "PRESETS",
    "Benchmark", "BenchmarkFormat", "Generation", "GenerateSettings", "Item", "Prompting", "Scored", "Shot",
    "LM_EVAL_VERSION", "LmEvalTask",
    "accuracy", "check_format", "generate_greedy", "get_kind", "greedy_generate", "is_hub_id", "load_benchmark",
    "load_prompts", "option_keys",
    "score_items", "score_records", "write_records",
]
