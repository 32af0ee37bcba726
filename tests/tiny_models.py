"""Write small random Llama checkpoints (a base and noisy "experts") for merge tests.

Experts are base + Gaussian noise per tensor so task vectors are dense and of
mixed sign, like real fine-tunes; one can be saved sharded to exercise the
sharded-index loader.
"""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama_config(num_layers: int = 2, hidden: int = 32, intermediate: int = 64, vocab: int = 64, tied: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )


def write_tiny_llama(path, config, seed: int = 0, dtype=torch.float32, max_shard_size=None):
    """Save a randomly initialised LlamaForCausalLM (safetensors) to `path`; returns the path."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():
        for param in model.parameters():  # norms start at 1; make them vary too
            param.add_(torch.randn_like(param) * 0.02)
    _save(model, path, max_shard_size)
    return Path(path)


def write_tiny_expert(base_path, path, seed: int, noise: float = 0.01, max_shard_size=None):
    """Save base + N(0, noise) per parameter, as a stand-in for a fine-tune."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(base_path), dtype="auto")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator, dtype=torch.float32).to(param.dtype) * noise)
    _save(model, path, max_shard_size)
    return Path(path)


def _save(model, path, max_shard_size):
    kwargs = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(path), **kwargs)


def write_tiny_family(root, num_experts: int = 3, sharded_expert: int = 1, dtype=torch.float32, **config_kwargs):
    """base + experts under `root` (in `dtype`); expert `sharded_expert` is written in several shards."""
    root = Path(root)
    config = tiny_llama_config(**config_kwargs)
    base = write_tiny_llama(root / "base", config, seed=0, dtype=dtype)
    experts = []
    for i in range(num_experts):
        shard = "20KB" if i == sharded_expert else None
        experts.append(write_tiny_expert(base, root / f"expert{i}", seed=100 + i, max_shard_size=shard))
    return base, experts


def write_tiny_qwen2_family(root, num_experts: int = 2, num_layers: int = 3, dtype=torch.bfloat16):
    """A small Qwen2-architecture base (q/k/v biases) and noisy experts saved in `dtype`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = Path(root)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    base_model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for param in base_model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    _save(base_model.to(dtype), root / "base", None)
    experts = []
    for i in range(num_experts):
        model = Qwen2ForCausalLM.from_pretrained(str(root / "base"), dtype=dtype)
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=generator).to(dtype) * 0.01)
        _save(model, root / f"expert{i}", None)
        experts.append(root / f"expert{i}")
    return root / "base", experts


def write_tiny_arch_family(root, arch: str = "qwen2", num_experts: int = 3, num_layers: int = 4,
                           dtype=torch.bfloat16, noise: float = 0.02, hidden: int = 32, intermediate: int = 64):
    """A small Qwen2- or Mistral-architecture base and experts saved in `dtype`.

    Expert e is base + N(0, (noise * (e + 1))^2) per parameter, drawn in float32 and rounded to `dtype`,
    so in bf16 the task vectors have many equal magnitudes, as real bf16 fine-tunes do.
    """
    import transformers

    classes = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM")}
    config_class, model_class = (getattr(transformers, name) for name in classes[arch])
    config = config_class(vocab_size=64, hidden_size=hidden, intermediate_size=intermediate,
                          num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64, tie_word_embeddings=False)
    root = Path(root)
    torch.manual_seed(0)
    base_model = model_class(config)
    with torch.no_grad():
        for param in base_model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    _save(base_model.to(dtype), root / "base", None)
    experts = []
    for e in range(num_experts):
        model = model_class.from_pretrained(str(root / "base"), dtype=dtype)
        generator = torch.Generator().manual_seed(200 + e)
        with torch.no_grad():
            for param in model.parameters():
                delta = torch.randn(param.shape, generator=generator) * (noise * (e + 1))
                param.copy_((param.float() + delta).to(dtype))
        _save(model, root / f"expert{e}", None)
        experts.append(root / f"expert{e}")
    return root / "base", experts


def write_tiny_lora(base_path, path, seed: int = 0, scale: float = 0.05, dtype=None, **lora_kwargs):
    """Save a PEFT LoRA adapter of `base_path` with random (nonzero) factors and saved tensors; returns the path.

    `lora_kwargs` go to peft's LoraConfig (target_modules, r, lora_alpha, use_rslora, ...).
    The factors are N(0, scale) and every trainable tensor (modules_to_save, biases)
    gets N(0, scale / 10) added, so each change the adapter can make is exercised.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=dtype or "auto")
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=generator).to(param.dtype)
            if "lora_" in name:
                param.copy_(noise * scale)
            else:
                param.add_(noise * scale / 10)
    peft_model.save_pretrained(str(path))
    return Path(path)


def peft_merged(base_path, adapter_path, out_path=None) -> dict:
    """The base with the adapter merged by peft's merge_and_unload() (saved to `out_path` if given): name -> tensor."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_path))
    merged = PeftModel.from_pretrained(model, str(adapter_path)).merge_and_unload()
    if out_path is not None:
        _save(merged, out_path, None)
    return {name: tensor.detach().clone() for name, tensor in merged.state_dict().items()}
