"""An ``lm_eval:`` benchmark entry's keys, checked without importing lm-eval (parse time stays fast).

The keys are those of ``lm_eval.simple_evaluate`` a search passes through, with
its defaults: ``num_fewshot`` (the task's own when unset; a task whose YAML says
0 keeps 0, as lm-eval does), ``fewshot_seed`` (``fewshot_random_seed``, 1234),
``apply_chat_template``, ``fewshot_as_multiturn`` (true, as in ``simple_evaluate``),
``system_instruction``, ``limit`` (the first N documents, or a fraction) and
``gen_kwargs`` (merged into a generative task's ``generation_kwargs``). Two are
evomerge's own: ``metric`` (which per-item metric is "correct"; default the task's
first correct/wrong metric) and ``filter`` (which filter pipeline's answer it
scores; default the task's first).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from evomerge.console import warn
from evomerge.errors import EvomergeError

LM_EVAL_VERSION = "0.4.13"
"""The lm-eval release the parity tests run (extra ``evomerge[lmeval]`` pins it)."""

INSTALL_HINT = f"pip install 'evomerge[lmeval]' (lm_eval=={LM_EVAL_VERSION})"
LMEVAL_KEYS = ("lm_eval", "num_fewshot", "fewshot_seed", "apply_chat_template", "fewshot_as_multiturn",
               "system_instruction", "limit", "metric", "filter", "gen_kwargs")
DEFAULT_FEWSHOT_SEED = 1234   # lm_eval.defaults.DEFAULT_OTHER_SEED, simple_evaluate's fewshot_random_seed
TASK_FILE_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class LmEvalOptions:
    """A checked ``lm_eval:`` entry: a registered task name or a task YAML, and how lm-eval would run it."""

    task: str
    num_fewshot: int | None = None
    fewshot_seed: int | None = DEFAULT_FEWSHOT_SEED
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = True
    system_instruction: str | None = None
    limit: int | float | None = None
    metric: str | None = None
    filter: str | None = None
    gen_kwargs: dict = field(default_factory=dict)

    @property
    def is_file(self) -> bool:
        return self.task.endswith(TASK_FILE_SUFFIXES)

    @property
    def default_name(self) -> str:
        """The benchmark's name when the entry gives none: the task name, or the YAML's file stem."""
        return Path(self.task).stem if self.is_file else self.task


def key_at(where: str, key: str) -> str:
    """How an error names a key: ``space.yaml: benchmarks[2].lm_eval`` in a space, ``benchmark 'x': lm_eval`` in Python."""
    return f"{where}.{key}" if where.endswith("]") else f"{where}: {key}"


def check_lm_eval_options(options: Mapping[str, Any], where: str, own_keys: tuple[str, ...] = ()) -> LmEvalOptions:
    """Check an entry with ``lm_eval:`` (types and files only; the task itself loads with the benchmark).

    ``own_keys`` are the other entry keys evomerge knows: with an lm-eval task they are refused by
    name, since the task's YAML sets the prompt, the few-shot draw and the scoring.
    """
    foreign = [key for key in options if key not in LMEVAL_KEYS]
    if foreign:
        known = foreign[0] in own_keys
        raise EvomergeError(f"{key_at(where, foreign[0])}: "
                            + ("does not apply to an lm_eval task (its YAML sets the prompt, few-shot examples "
                               "and scoring)" if known else "unknown key")
                            + f"; an lm_eval entry takes name, weight, {', '.join(LMEVAL_KEYS)}")
    task = options["lm_eval"]
    if not isinstance(task, str) or not task.strip():
        raise EvomergeError(f"{key_at(where, 'lm_eval')}: must be an lm-eval task name (arc_easy) or a task "
                            "YAML (path/to/task.yaml)")
    if task.endswith(TASK_FILE_SUFFIXES) and not Path(task).expanduser().is_file():
        raise EvomergeError(f"{key_at(where, 'lm_eval')}: task file {task} does not exist")
    require_lm_eval(f"{key_at(where, 'lm_eval')}: task {task!r}")
    num_fewshot = options.get("num_fewshot")
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0):
        raise EvomergeError(f"{key_at(where, 'num_fewshot')}: must be an integer >= 0, got {num_fewshot!r}")
    seed = options.get("fewshot_seed", DEFAULT_FEWSHOT_SEED)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise EvomergeError(f"{key_at(where, 'fewshot_seed')}: must be an integer (lm-eval's default: 1234) or null")
    for key in ("apply_chat_template", "fewshot_as_multiturn"):
        if key in options and not isinstance(options[key], bool):
            raise EvomergeError(f"{key_at(where, key)}: must be true or false")
    for key in ("system_instruction", "metric", "filter"):
        if options.get(key) is not None and (not isinstance(options[key], str) or not options[key]):
            raise EvomergeError(f"{key_at(where, key)}: must be a non-empty string")
    limit = options.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float))
                              or limit <= 0 or (isinstance(limit, float) and limit >= 1 and not limit.is_integer())):
        raise EvomergeError(f"{key_at(where, 'limit')}: must be a number of documents (>= 1) or a fraction "
                            f"in (0, 1), as lm-eval's --limit; got {limit!r}")
    if isinstance(limit, float) and limit >= 1:
        limit = int(limit)
    gen_kwargs = options.get("gen_kwargs") or {}
    if not isinstance(gen_kwargs, dict):
        raise EvomergeError(f"{key_at(where, 'gen_kwargs')}: must be a mapping such as {{max_gen_toks: 64}}")
    if gen_kwargs.get("do_sample"):
        raise EvomergeError(f"{key_at(where, 'gen_kwargs')}: do_sample: true samples; evomerge scores greedy "
                            "decoding only (each item must be right or wrong, not right by chance)")
    return LmEvalOptions(task, num_fewshot, seed, options.get("apply_chat_template", False),
                         options.get("fewshot_as_multiturn", True), options.get("system_instruction"), limit,
                         options.get("metric"), options.get("filter"), dict(gen_kwargs))


def require_lm_eval(what: str) -> None:
    """lm-eval is an optional extra: one line saying what to install when it is missing."""
    if importlib.util.find_spec("lm_eval") is None:
        raise EvomergeError(f"{what} needs lm-eval, which is not installed; {INSTALL_HINT}")


_warned_version = False


def warn_other_version() -> None:
    """Parity is tested against one lm-eval release; another one may build prompts differently."""
    global _warned_version
    try:
        installed = importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return
    if installed != LM_EVAL_VERSION and not _warned_version:
        _warned_version = True
        warn(f"lm-eval {installed} is installed; evomerge's parity with lm-eval is tested on {LM_EVAL_VERSION}")
