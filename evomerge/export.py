"""Write one merge as a Hugging Face checkpoint anyone can load and reproduce.

The folder holds sharded safetensors, config and tokenizer (via save_pretrained),
the recipe as JSON (what evomerge reproduces bit for bit), a mergekit YAML
(so the merge can be rebuilt without evomerge) and a README model card.
"""

from __future__ import annotations

import json
from pathlib import Path

from evomerge.merge import MergeCore, Recipe, recipe_to_mergekit_yaml

RECIPE_FILE = "evomerge_recipe.json"
MERGEKIT_FILE = "mergekit.yaml"
RANDOM_METHODS = ("dare_ties", "dare_linear", "della")


def export_checkpoint(
    core: MergeCore,
    recipe: Recipe,
    out_dir: str | Path,
    *,
    seed: int,
    base_path: str,
    expert_paths: list[str],
    expert_names: list[str] | None = None,
    details: dict | None = None,
    max_shard_size: str = "1GB",
    model=None,
    tokenizer=None,
) -> Path:
    """Merge `recipe` into `model` (a fresh one from the core if None) and save it with its card.

    Passing the model a search already holds keeps one copy of the weights on the device.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if model is None:
        model, tokenizer = core.new_model()
    core.merge_into(model, recipe, seed=seed)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    num_layers = model.config.num_hidden_layers
    # the core's dtype: mergekit then computes deltas and TIES selections in it, as the core did
    dtype = str(core.dtype).removeprefix("torch.")
    mergekit_yaml = recipe_to_mergekit_yaml(recipe, base_path, expert_paths, num_layers, dtype=dtype)
    (out_dir / MERGEKIT_FILE).write_text(mergekit_yaml)
    (out_dir / RECIPE_FILE).write_text(
        json.dumps(
            {
                "recipe": recipe.to_dict(),
                "seed": seed,
                "base": str(base_path),
                "experts": [str(p) for p in expert_paths],
                "details": details or {},
            },
            indent=2,
        )
    )
    (out_dir / "README.md").write_text(
        model_card(recipe, seed, base_path, expert_paths, expert_names, details or {}, mergekit_yaml)
    )
    return out_dir


def model_card(
    recipe: Recipe,
    seed: int,
    base_path: str,
    expert_paths: list[str],
    expert_names: list[str] | None,
    details: dict,
    mergekit_yaml: str,
) -> str:
    """A README that says what was merged, how, and how well it was estimated to do."""
    names = expert_names or [Path(p).name for p in expert_paths]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, evomerge]",
        "---",
        "",
        f"# Merge of {len(expert_paths)} fine-tunes of `{Path(base_path).name}` by evomerge",
        "",
        f"- method: **{recipe.method}**",
        f"- base model: `{base_path}`",
    ]
    lines += [f"- expert `{name}`: `{path}`" for name, path in zip(names, expert_paths)]
    lines.append(f"- candidate seed: {seed}")
    for key, value in details.items():
        lines.append(f"- {key}: {value}")
    lines += [
        "",
        "## Recipe",
        "",
        "Exact recipe (per-layer and per-module coefficients), reproducible with evomerge:",
        "",
        "```json",
        json.dumps(recipe.to_dict(), indent=2),
        "```",
        "",
        "## mergekit",
        "",
        f"The same merge as a `mergekit-yaml` config (also in `{MERGEKIT_FILE}`):",
        "",
        "```yaml",
        mergekit_yaml.rstrip(),
        "```",
    ]
    if recipe.method in RANDOM_METHODS:
        lines += [
            "",
            "Note: this method drops parameters at random; mergekit draws its own random masks,",
            "so its result matches this checkpoint in distribution, not bit for bit.",
        ]
    return "\n".join(lines) + "\n"


def add_card_figures(out_dir: str | Path, figures: list[tuple[str, str]]) -> Path:
    """Show ``(title, relative PNG path)`` figures in an export's card, before its recipe."""
    card = Path(out_dir) / "README.md"
    text = card.read_text()
    section = ["## Search", ""]
    for title, path in figures:
        section += [f"![{title}]({path})", ""]
    marker = "## Recipe"
    text = text.replace(marker, "\n".join(section) + "\n" + marker, 1) if marker in text else (
        text + "\n" + "\n".join(section))
    tmp = card.with_name(card.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(card)
    return card
