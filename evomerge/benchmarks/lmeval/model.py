"""lm-eval's model interface answered by the in-memory model: no checkpoint written, no ``HFLM`` built.

lm-eval's ``TemplateLM`` (its own class) turns a ``(context, continuation)``
request into token ids; this module answers the token-level questions the way
lm-eval's Hugging Face backend (``HFLM``, ``lm_eval --model hf``) does, so a task
scores the same in a search as under ``lm_eval.simple_evaluate``:

* tokenization: ``tokenizer.encode`` with the tokenizer's own special tokens,
  none when the text already starts with ``<bos>`` (a chat template wrote it);
* log-likelihood: ``(context + continuation)[-(max_length + 1):][:-1]`` fed once,
  right-padded, ``log_softmax`` in the logits' dtype; ``is_greedy`` is the argmax
  at every continuation position equal to the continuation;
* generation: left-padded batches, ``model.generate`` with the checkpoint's own
  generation config, ``max_length = width + max_gen_toks`` and lm-eval's stop
  criteria, then the continuation decoded without special tokens and cut at
  each stop string (lm-eval's ``postprocess_generated_text``).

Requests are sorted by length and batched (`evomerge.batching`: halved on CUDA
out of memory). Batching and padding change nothing but rounding: items whose
choices tie to the last bit may differ (tests/test_lmeval_parity.py).
"""

from __future__ import annotations

import functools
import json
from typing import Sequence

import torch

from evomerge.batching import run_batches
from evomerge.benchmarks.generation import left_padded
from evomerge.errors import EvomergeError

DEFAULT_MAX_LENGTH = 2048    # HFLM._DEFAULT_MAX_LENGTH: used when neither config nor tokenizer has a length
DEFAULT_MAX_GEN_TOKS = 256   # HFLM.max_gen_toks


def render_chat(tokenizer, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
    """HFLM's ``apply_chat_template``: the tokenizer's template as text (what ``build_all_requests`` renders
    turns with); a template that refuses a system turn is asked again without it."""
    import jinja2

    kwargs = {"tokenize": False, "add_generation_prompt": add_generation_prompt,
              "continue_final_message": not add_generation_prompt}
    try:
        return tokenizer.apply_chat_template(chat_history, **kwargs)
    except jinja2.exceptions.TemplateError:
        return tokenizer.apply_chat_template([m for m in chat_history if m["role"] != "system"], **kwargs)


class _InMemoryLM:
    """The methods of an lm-eval ``TemplateLM`` over an in-memory causal LM (mixed in by `in_memory_lm`)."""

    backend = "causal"

    def __init__(self, model, tokenizer, batch_size: int):
        super().__init__()
        self.model, self.tokenizer, self.batch_size = model, tokenizer, max(1, int(batch_size))
        self.add_bos_token = None   # HFLM's default: the tokenizer decides
        self._device = next(model.parameters()).device

    # ---------------------------------------------------------------- what HFLM exposes

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        from lm_eval.models.utils import resolve_max_length

        return resolve_max_length(self.model.config, self.tokenizer, default=DEFAULT_MAX_LENGTH)

    @property
    def pad_token_id(self) -> int:
        """HFLM's ``configure_pad_token`` without changing the tokenizer: pad, else unk, else eos."""
        for token_id in (self.tokenizer.pad_token_id, self.tokenizer.unk_token_id, self.tokenizer.eos_token_id):
            if token_id is not None:
                return token_id
        return 0

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        from lm_eval.models.utils import has_bos_prefix

        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special = {"add_special_tokens": False}
        encoding = self.tokenizer.encode(string, **special)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return render_chat(self.tokenizer, chat_history, add_generation_prompt)

    # ---------------------------------------------------------------- log-likelihood

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation), is_greedy)`` per ``((context, continuation), context_ids, continuation_ids)``."""
        max_length = self.max_length
        rows = []
        for _, context, continuation in requests:
            if not continuation:
                raise EvomergeError("an lm-eval request has an empty continuation (its target tokenizes to nothing)")
            whole = (list(context) + list(continuation))[-(max_length + 1):]
            rows.append((whole[:-1], len(continuation)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(rows)

        def step(start: int, stop: int) -> None:
            batch = [rows[i] for i in order[start:stop]]
            width = max(len(inp) for inp, _ in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (inp, _) in enumerate(batch):
                ids[row, : len(inp)] = torch.tensor(inp, dtype=torch.long)
            logprobs = torch.log_softmax(self.model(input_ids=ids.to(self._device)).logits, dim=-1)
            for row, (index, (inp, n_cont)) in enumerate(zip(order[start:stop], batch)):
                scored = logprobs[row, len(inp) - n_cont: len(inp)]
                targets = torch.tensor(requests[index][2][-n_cont:], dtype=torch.long, device=scored.device)
                greedy = bool((scored.argmax(dim=-1) == targets).all())
                results[index] = (float(scored.gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum()), greedy)

        run_batches(self.model, "lm_eval_loglikelihood", len(rows), self.batch_size, step)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise EvomergeError("lm-eval perplexity tasks (loglikelihood_rolling) have no per-item right or wrong "
                            "answer; evomerge scores multiple_choice, generate_until and loglikelihood tasks")

    # ---------------------------------------------------------------- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations of each request's context, cut at its stop strings (HFLM's ``generate_until``)."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}   # requests with the same generation kwargs share batches
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        for indices in groups.values():
            texts = self._generate_group([requests[i].args[0] for i in indices], requests[indices[0]].args[1])
            for index, text in zip(indices, texts):
                results[index] = text
        return results

    def _generate_group(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        kwargs = normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKS)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode(self.eot_token_id,
                                                                                     skip_special_tokens=False))
        max_gen_toks = kwargs.pop("max_gen_toks")
        max_context = self.max_length - max_gen_toks
        if max_context <= 0:
            raise EvomergeError(f"lm-eval task asks for {max_gen_toks} new tokens, but the model's maximum "
                                f"sequence length is {self.max_length}; lower max_gen_toks (gen_kwargs)")
        encoded = [self._context_ids(c, max_context) for c in contexts]
        order = sorted(range(len(contexts)), key=lambda j: (-len(encoded[j]), contexts[j]))
        texts: list[str | None] = [None] * len(contexts)

        def step(start: int, stop: int) -> None:
            rows = order[start:stop]
            ids, mask = left_padded([encoded[j] for j in rows], self.pad_token_id, self._device)
            out = self._generate(ids, mask, until, max_gen_toks, dict(kwargs))
            for j, new_tokens in zip(rows, out[:, ids.shape[1]:].tolist()):
                texts[j] = self._postprocess(self.tok_decode(new_tokens), until)

        run_batches(self.model, "lm_eval_generate", len(contexts), self.batch_size, step)
        return texts

    def _context_ids(self, context: str, max_context: int) -> list[int]:
        """HFLM's ``tok_batch_encode`` for one string: no special tokens when it starts with ``<bos>``."""
        from lm_eval.models.utils import has_bos_prefix

        special = {"add_special_tokens": False} if has_bos_prefix(context, self.tokenizer.bos_token) else {}
        return self.tokenizer(context, **special)["input_ids"][-max_context:]

    def _generate(self, ids: torch.Tensor, mask: torch.Tensor, until: Sequence[str], max_gen_toks: int,
                  kwargs: dict) -> torch.Tensor:
        """HFLM's ``_model_generate``: greedy when temperature is 0, the checkpoint's other defaults kept."""
        from lm_eval.models.utils_hf import stop_sequences_criteria

        kwargs["temperature"] = kwargs.get("temperature", 0.0)
        if kwargs["temperature"] == 0.0 and kwargs.get("do_sample") is None:
            kwargs["do_sample"] = False
        if kwargs.get("do_sample"):
            raise EvomergeError("an lm-eval task samples its generations (do_sample: true); evomerge scores "
                                "greedy decoding only")
        if kwargs["temperature"] == 0.0:
            kwargs.pop("temperature")
        criteria = stop_sequences_criteria(self.tokenizer, list(until), ids.shape[1], ids.shape[0])
        return self.model.generate(input_ids=ids, attention_mask=mask, max_length=ids.shape[1] + max_gen_toks,
                                   stopping_criteria=criteria, pad_token_id=self.pad_token_id, use_cache=True,
                                   **kwargs)

    @staticmethod
    def _postprocess(text: str, until: Sequence[str]) -> str:
        from lm_eval.models.utils import postprocess_generated_text

        return postprocess_generated_text(generation=text, stop=list(until), think_end_token=None)


@functools.cache
def _lm_class() -> type:
    """The in-memory model as a subclass of lm-eval's own ``TemplateLM`` (lm-eval is imported only here)."""
    from lm_eval.api.model import TemplateLM

    return type("InMemoryLM", (_InMemoryLM, TemplateLM), {})


def in_memory_lm(model, tokenizer, batch_size: int):
    """An lm-eval ``LM`` whose answers come from ``model`` as it is now (a merge just written into it)."""
    return _lm_class()(model, tokenizer, batch_size)
