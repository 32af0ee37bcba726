"""Write one merge as a Hugging Face checkpoint anyone can load and reproduce.

The folder holds sharded safetensors, config and tokenizer (via save_pretrained),
the recipe as JSON (what evomerge reproduces bit for bit), a mergekit YAML
(so the merge can be rebuilt without evomerge) and a README model card.

Every export (this one and the data-flow one) is written through
`export_folder`: into a hidden temporary sibling that is renamed into place
once complete, so the folder is always a whole export or absent, and an
existing non-empty folder is replaced only when it is an earlier export of the
same run (`evomerge_export.json` names its run) or when forced.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping

from evomerge.errors import EvomergeError
from evomerge.files import check_free_space, write_text_atomic, writing
from evomerge.merge import MergeCore, Recipe, recipe_to_mergekit_yaml
from evomerge.merge.adapters import is_adapter

RECIPE_FILE = "evomerge_recipe.json"
MERGEKIT_FILE = "mergekit.yaml"
EXPORT_FILE = "evomerge_export.json"
"""Written last into every export: the run that wrote it (``{"owner": {"study": ..., "run": ...}}``)."""
LEGACY_RECORDS = (RECIPE_FILE,)  # exports made before EXPORT_FILE: their details name the study
RANDOM_METHODS = ("dare_ties", "dare_linear", "della")
SAMPLED_METHODS = ("arcee_fusion",)  # random samples of tensors over 1M elements (their quartiles)


def check_export_target(out_dir: str | Path, owner: Mapping | None = None, force: bool = False) -> None:
    """Refuse to export into a non-empty folder that is not an earlier export of the same run (unless forced).

    ``owner`` names the run (``{"study": name, "run": folder}``); a run folder is never an export target.
    """
    out_dir = Path(out_dir)
    run = (owner or {}).get("run")
    if run and Path(run).resolve().is_relative_to(out_dir.resolve()):
        raise EvomergeError(f"export folder {out_dir} holds the run {run} itself; choose another --out")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise EvomergeError(f"export folder {out_dir} is a file; choose another --out")
    if force or not any(out_dir.iterdir()) or _same_owner(_written_by(out_dir), dict(owner or {})):
        return
    raise EvomergeError(
        f"export folder {out_dir} is not empty and is not an earlier export of this run; "
        "choose another --out, or pass --force to replace it (everything in it is deleted)")


def _written_by(folder: Path) -> dict | None:
    """The owner recorded in an export folder, or None when evomerge did not write it."""
    for name in (EXPORT_FILE, *LEGACY_RECORDS):
        try:
            data = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if name == EXPORT_FILE:
            return dict(data.get("owner") or {})
        return {"study": (data.get("details") or {}).get("study")}
    return None


def _same_owner(found: dict | None, owner: dict) -> bool:
    """An export of the same run: the same study and run folder (older exports record the study only)."""
    if found is None or (not found and owner):
        return False
    return all(found.get(key) == owner.get(key) for key in ("study", "run") if key in found)


#: Room for what an export writes besides its weights (config, tokenizer, card, figures).
EXTRA_BYTES = 20_000_000


def state_bytes(tensors) -> int:
    """Bytes the distinct tensors take in safetensors (shared storage counted once, as it is saved)."""
    seen = {}
    for tensor in tensors:
        seen.setdefault((tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel()),
                        tensor.numel() * tensor.element_size())
    return sum(seen.values())


@contextmanager
def export_folder(out_dir: str | Path, owner: Mapping | None = None, force: bool = False,
                  needs: int | None = None) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out_dir`` to write an export into; renamed into place on success.

    A killed export leaves only a hidden ``.NAME.partial-PID`` sibling, removed by
    the next export to the same place; ``out_dir`` itself is complete or absent.
    ``needs``: the bytes of its weights, when known: a filesystem without that much room
    (plus `EXTRA_BYTES`) is refused before anything is written; a write the machine refuses
    anyway ends as one `MachineError` naming ``out_dir``, with nothing left behind.
    """
    out_dir = Path(out_dir)
    check_export_target(out_dir, owner, force)
    total = None if needs is None else needs + EXTRA_BYTES
    if total is not None:
        check_free_space(out_dir, total, "an export")
    with writing(out_dir, total):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        for leftover in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
            if not _pid_alive(leftover.name.rsplit("-", 1)[-1]):
                shutil.rmtree(leftover, ignore_errors=True)
        partial = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        try:
            yield partial
            (partial / EXPORT_FILE).write_text(json.dumps({"owner": dict(owner or {})}, indent=2))
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        if out_dir.exists():  # an earlier export (or a forced folder): swap, then delete the old one
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            partial.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            partial.rename(out_dir)


def _pid_alive(text: str) -> bool:
    try:
        os.kill(int(text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


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
    owner: Mapping | None = None,
    force: bool = False,
    finish: Callable[[Path], None] | None = None,
) -> Path:
    """Merge `recipe` into `model` (a fresh one from the core if None) and save it with its card.

    Passing the model a search already holds keeps one copy of the weights on the device.
    Written all or nothing through `export_folder` (``owner``, ``force``: see there);
    ``finish(folder)`` adds to the export before it is complete (e.g. the card's figures).
    """
    out_dir = Path(out_dir)
    if model is None:
        model, tokenizer = core.new_model()
    with export_folder(out_dir, owner, force, needs=state_bytes(model.state_dict().values())) as folder:
        core.merge_into(model, recipe, seed=seed)
        model.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        num_layers = model.config.num_hidden_layers
        # the core's dtype: mergekit then computes deltas and TIES selections in it, as the core did
        dtype = str(core.dtype).removeprefix("torch.")
        mergekit_yaml = None  # data-informed methods (RegMean, Fisher) have no mergekit equivalent
        if recipe.spec.mergekit_name is not None:
            mergekit_yaml = recipe_to_mergekit_yaml(recipe, base_path, expert_paths, num_layers, dtype=dtype)
            (folder / MERGEKIT_FILE).write_text(mergekit_yaml)
        record = {"recipe": recipe.to_dict(), "seed": seed, "base": str(base_path),
                  "experts": [str(p) for p in expert_paths], "details": details or {}}
        (folder / RECIPE_FILE).write_text(json.dumps(record, indent=2))
        (folder / "README.md").write_text(
            model_card(recipe, seed, base_path, expert_paths, expert_names, details or {}, mergekit_yaml)
        )
        if finish is not None:
            finish(folder)
    return out_dir


def model_card(
    recipe: Recipe,
    seed: int,
    base_path: str,
    expert_paths: list[str],
    expert_names: list[str] | None,
    details: dict,
    mergekit_yaml: str | None,
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
    lines += [f"- expert `{name}`: `{path}`" + (" (LoRA adapter on the base)" if is_adapter(path) else "")
              for name, path in zip(names, expert_paths)]
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
    ]
    if mergekit_yaml is None:
        lines += [
            f"mergekit has no `{recipe.method}` merge: it needs statistics of each expert on its task's data",
            "(collected by evomerge), so no `mergekit.yaml` is written. The exact recipe above and the",
            "statistics re-make this checkpoint with evomerge.",
        ]
    else:
        lines += [
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
    if recipe.method in SAMPLED_METHODS:
        lines += [
            "",
            "Note: on tensors of over 1M elements this method reads its threshold off a random sample;",
            "mergekit draws its own sample there, so those tensors match in distribution, not bit for bit.",
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
    return write_text_atomic(card, text)
