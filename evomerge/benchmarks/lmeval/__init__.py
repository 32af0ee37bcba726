"""lm-evaluation-harness tasks as benchmarks (``benchmarks: - {lm_eval: arc_easy}``; extra ``evomerge[lmeval]``).

| module | concept |
|---|---|
| `options.py` | an ``lm_eval:`` entry's keys (num_fewshot, chat template, limit, metric, filter, ...), checked without lm-eval |
| `tasks.py` | the task loaded by lm-eval's ``TaskManager``: documents -> items, lm-eval's requests, filters and per-item metrics; another split's prompts as data |
| `model.py` | lm-eval's model interface answered by the in-memory model, as lm-eval's HF backend would |

lm-eval builds every prompt and judges every answer; evomerge only supplies
log-likelihoods and generations, so an item is right exactly when
``lm_eval.simple_evaluate`` with ``--model hf`` says so (tests/test_lmeval_parity.py).
lm-eval is imported inside functions only: it is optional.
"""

from evomerge.benchmarks.lmeval.model import in_memory_lm
from evomerge.benchmarks.lmeval.options import (
    INSTALL_HINT,
    LM_EVAL_VERSION,
    LMEVAL_KEYS,
    LmEvalOptions,
    check_lm_eval_options,
)
from evomerge.benchmarks.lmeval.tasks import (
    SCORED_OUTPUT_TYPES,
    DocResult,
    LmEvalTask,
    kind_name,
    lm_eval_prompts,
    load_lm_eval_task,
)

__all__ = ["INSTALL_HINT", "LM_EVAL_VERSION", "LMEVAL_KEYS", "SCORED_OUTPUT_TYPES", "DocResult", "LmEvalOptions",
           "LmEvalTask", "check_lm_eval_options", "in_memory_lm", "kind_name", "lm_eval_prompts", "load_lm_eval_task"]
