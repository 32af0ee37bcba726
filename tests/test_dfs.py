"""Data-flow-space merges: paths through loaded layers, their export, mergekit equality, the space section.

Tiny random Llamas (tests/tiny_models.py) for the model and export checks; the
quick zoo for the search end to end (parameter-space run, then DFS on top of it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.cli import main
from evomerge.dataflow import DataFlowPath, LayerPool
from evomerge.dataflow.export import export_path, path_to_mergekit_yaml
from evomerge.errors import EvomergeError
from evomerge.merge import MergeCore, Recipe, open_model, recipe_to_mergekit_yaml
from evomerge.search.dfs_genome import dfs_genome_space, genome_to_path, path_genome
from evomerge.search.space import load_search_space, parse_search_space

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_llama_config, write_tiny_family, write_tiny_llama  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# positions: a0 a1 b1 b2 a1 b2 -- b1 follows a1 (another model), a1 and b2 repeat
MIXED = [("a", 0), ("a", 1), ("b", 1), ("b", 2), ("a", 1), ("b", 2)]
SCALES = [1.0, 1.0, 0.8, 1.0, 1.5, 0.9]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Paths of a tiny base and two experts (3 layers), and a pool over the experts."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("dfs_tiny")
    base, experts = write_tiny_family(root, num_experts=2, sharded_expert=1, num_layers=3)
    models = {name: AutoModelForCausalLM.from_pretrained(str(path)).eval() for name, path in zip("ab", experts)}
    return {"root": root, "base": base, "experts": experts, "models": models, "pool": LayerPool(models),
            "refs": {name: str(path) for name, path in zip("ab", experts)}}


def greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    return ids


def test_identity_path_is_the_source_model(tiny):
    ids = torch.randint(3, 64, (2, 9))
    model = tiny["pool"].assemble(DataFlowPath.unscaled([("a", i) for i in range(3)]))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny["models"]["a"](ids).logits)


@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "scaled"])
def test_path_model_shares_weights_and_matches_its_export(tiny, tmp_path, scaled):
    from transformers import AutoModelForCausalLM

    path = DataFlowPath(MIXED, SCALES if scaled else [1.0] * len(MIXED))
    model = tiny["pool"].assemble(path)
    owned = {p.data_ptr() for m in tiny["models"].values() for p in m.parameters()}
    assert {p.data_ptr() for p in model.parameters()} <= owned, "a path must not copy weights"
    assert model.config.num_hidden_layers == len(MIXED)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(len(MIXED)))

    out = export_path(tiny["pool"], path, tmp_path / "export", tokenizer=None, model_refs=tiny["refs"],
                      max_shard_size="40KB")
    assert len(list(out.glob("model-*.safetensors"))) > 1
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert loaded.config.num_hidden_layers == len(MIXED)
    ids = torch.randint(3, 64, (2, 9))
    with torch.no_grad():
        ours, theirs = model(ids).logits, loaded(ids).logits
        if scaled:  # weight * m vs (weight @ x) * m: equal up to float rounding
            torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(theirs, ours)
        # generation with a KV cache (one cache entry per position) = plain transformers = no cache
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        assert torch.equal(generated, loaded.generate(ids, attention_mask=torch.ones_like(ids), **kwargs))
        assert torch.equal(generated, greedy_without_cache(model, ids, 6))


def test_folded_scaling_is_scaling_the_hidden_state(tiny):
    """Branch outputs x 1/prod(scales) = the stream x scale entering each layer (Sakana's form), up to eps."""
    path = DataFlowPath(MIXED, SCALES)
    folded = tiny["pool"].assemble(path)
    ids = torch.randint(3, 64, (2, 9))
    with torch.no_grad():
        expected = folded(ids).logits.clone()
        plain = tiny["pool"].assemble(DataFlowPath.unscaled(MIXED))
        handles = [layer.register_forward_pre_hook(lambda m, args, kwargs, s=s: ((args[0] * s, *args[1:]), kwargs),
                                                   with_kwargs=True)
                   for layer, s in zip(plain.model.layers, SCALES)]
        try:
            stream_scaled = plain(ids).logits
        finally:
            for handle in handles:
                handle.remove()
    torch.testing.assert_close(stream_scaled, expected, atol=1e-4, rtol=1e-4)


def run_mergekit(text: str, out: Path) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out),
              MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
    return open_model(out).load()


@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "scaled"])
def test_mergekit_passthrough_remakes_the_export_bit_for_bit(tiny, tmp_path, scaled):
    pytest.importorskip("mergekit")
    path = DataFlowPath(MIXED, SCALES if scaled else [1.0] * len(MIXED))
    out = export_path(tiny["pool"], path, tmp_path / "export", tokenizer=None, model_refs=tiny["refs"])
    text = (out / "mergekit.yaml").read_text()
    assert yaml.safe_load(text)["merge_method"] == "passthrough"
    assert ("scale" in text) == scaled
    theirs = run_mergekit(text, tmp_path / "mergekit")
    ours = open_model(out).load()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_mergekit_multi_remakes_a_path_through_a_merge(tiny, tmp_path):
    """PS+DFS: a source that is itself a TIES merge is the first document of a mergekit-multi file."""
    pytest.importorskip("mergekit")
    from mergekit.scripts.multimerge import main as multimerge

    recipe = Recipe("ties", {"weight": [0.7, 0.5], "density": 0.6})
    core = MergeCore(tiny["base"], tiny["experts"], device="cpu")
    merged, _ = core.new_model()
    core.merge_into(merged, recipe, seed=0)
    pool = LayerPool({"ps": merged.eval(), "b": tiny["models"]["b"]})
    path = DataFlowPath([("ps", 0), ("ps", 1), ("b", 1), ("ps", 2)], [1.0, 1.0, 1.0, 0.7])
    ps_yaml = recipe_to_mergekit_yaml(recipe, tiny["base"], tiny["experts"], 3)
    out = export_path(pool, path, tmp_path / "export", tokenizer=None, model_refs={"b": tiny["refs"]["b"]},
                      intermediates={"ps": ps_yaml})
    documents = list(yaml.safe_load_all((out / "mergekit.yaml").read_text()))
    assert [d.get("name") for d in documents] == ["ps", None]
    multimerge.main(args=[str(out / "mergekit.yaml"), "--intermediate-dir", str(tmp_path / "inter"),
                          "--out-path", str(tmp_path / "mergekit"), "--no-copy-tokenizer"], standalone_mode=False)
    ours, theirs = open_model(out).load(), open_model(tmp_path / "mergekit").load()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_slices_group_consecutive_layers_with_equal_scale():
    path = DataFlowPath([("a", 0), ("a", 1), ("a", 2), ("b", 2), ("b", 3), ("a", 0)], [1, 1, 1, 1, 0.5, 1])
    assert [(s.source, s.start, s.stop, s.multiplier) for s in path.slices()] == [
        ("a", 0, 3, 1.0), ("b", 2, 3, 1.0), ("b", 3, 4, 2.0), ("a", 0, 1, 2.0)]
    text = path_to_mergekit_yaml(path, {"a": "/m/a", "b": "/m/b"})
    assert [s["sources"][0]["layer_range"] for s in yaml.safe_load(text)["slices"]] == [[0, 3], [2, 3], [3, 4], [0, 1]]


# ---------------------------------------------------------------- the space section and genome


def dfs_raw(zoo_dir: Path, **dfs) -> dict:
    return {
        "name": "dfs",
        "models": {"base": str(zoo_dir / "base"),
                   "experts": {t: str(zoo_dir / "experts" / t) for t in ("arith", "lang")}},
        "dfs": {"sources": ["arith", "lang"], "repeats": 2, **dfs},
        "benchmarks": [{"name": t, "path": str(zoo_dir / "bench" / f"{t}.jsonl")} for t in ("arith", "lang")],
        "estimator": {"subset_size": 20, "calibration_merges": 2},
        "optimizer": {"trials": 4, "seed": 0},
        "device": "cpu",
    }


def test_genome_gives_paths_within_budget(zoo_dir):
    space = parse_search_space(dfs_raw(zoo_dir, max_layers=5, max_params="400K",
                                       paths=[[{"source": "lang", "layers": [0, 2]}, {"source": "arith", "layers": [2, 4]}]]))
    dfs = space.dfs
    genes = dfs_genome_space(dfs)
    assert sum(n.startswith("include.") for n in genes) == 2 * (4 + 4)  # T = M x r
    assert sum(n.startswith("level.") for n in genes) == 2 * (4 + 1)
    everything = {n: (1.0 if n.startswith("include.") else 0.3) for n in genes}
    path = genome_to_path(dfs, everything)
    assert len(path) <= 5 and dfs.path_params(path.layers) <= 400_000
    assert not path.is_scaled  # equal levels
    hand = genome_to_path(dfs, path_genome(dfs, dfs.paths[0].layers))
    assert hand.layers == [("lang", 0), ("lang", 1), ("arith", 2), ("arith", 3)] and not hand.is_scaled
    levels = dict(path_genome(dfs, hand.layers), **{"level.lang.L1": 0.5, "level.arith.L1": -0.5})
    assert genome_to_path(dfs, levels).scales == [1.0, 1.0, 0.5, 1.0]  # 2 ** (level(arith L1) - level(lang L1))


@pytest.mark.parametrize("mutate, message", [
    (lambda r, z: r["dfs"].update(sources=["arith", "tiny"]), "hidden_size"),
    (lambda r, z: r["dfs"].update(max_layers=3, paths=[[{"source": "lang", "layers": [0, 4]}]]),
     "has 4 layers, over the budget dfs.max_layers 3"),
    (lambda r, z: r["dfs"].update(max_params="200K", paths=[[{"source": "lang", "layers": [0, 4]}]]),
     "over the budget dfs.max_params"),
    (lambda r, z: r["dfs"].update(max_params=1000), "below the smallest possible path"),
    (lambda r, z: r["dfs"].update(repeats=1, paths=[[{"source": "lang", "layers": [2, 4]}, {"source": "lang", "layers": [0, 1]}]]),
     "raise dfs.repeats"),
    (lambda r, z: r["dfs"].update(sources=["arith", {"name": "ps", "source": str(z / "runs" / "nope")}]),
     "nor an evomerge run folder"),
    (lambda r, z: r["dfs"].update(sources=["arith", "cipher"]), "'cipher' is not a model of this space"),
    (lambda r, z: r.update(merge={"method": "ties"}), "either merge (parameter space) or dfs"),
    (lambda r, z: r["dfs"].update(scaling="table"), "dfs.scaling 'table' is unknown"),
])
def test_bad_dfs_space_is_one_clear_error(zoo_dir, tmp_path, mutate, message):
    config = tiny_llama_config(num_layers=2, hidden=32, vocab=69)
    write_tiny_llama(tmp_path / "tiny", config)
    raw = dfs_raw(zoo_dir)
    raw["models"]["experts"]["tiny"] = str(tmp_path / "tiny")
    mutate(raw, tmp_path)
    with pytest.raises(EvomergeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_search_space(raw, source="dfs.yaml")


def test_shipped_dfs_demo_space_is_valid(zoo_dir):
    text = (REPO / "search_spaces" / "dfs_demo.yaml").read_text().replace("runs/zoo", str(zoo_dir))
    raw = yaml.safe_load(text)
    raw["benchmarks"] = [b for b in raw["benchmarks"] if Path(b["path"]).exists()]  # the quick zoo's tasks
    space = parse_search_space(raw, source="dfs_demo.yaml")
    assert space.dfs is not None and len(dfs_genome_space(space.dfs)) > 0


# ---------------------------------------------------------------- end to end on the quick zoo


def write_yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_ps_then_dfs_search_validate_export(zoo_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from evomerge.search.records import Ranking
    from evomerge.search.runs import load_run_space, open_existing_study
    from evomerge.search.sources import resolve_sources
    from evomerge.trial_export import export_trial

    runs = tmp_path / "runs"
    ps = dfs_raw(zoo_dir)
    ps.pop("dfs")
    ps.update(name="ps", merge={"method": "ties", "granularity": "global"}, optimizer={"trials": 3, "seed": 0})
    ps_file = write_yaml(tmp_path / "ps.yaml", ps)
    assert main(["search", str(ps_file), "--runs-root", str(runs), "--trials", "2", "--no-progress"]) == 0

    dfs = dfs_raw(zoo_dir, max_layers=6)
    dfs["dfs"]["sources"] = [{"name": "ps", "source": str(runs / "ps")}, "lang"]
    reference = parse_search_space(dfs, source="dfs.yaml").dfs.sources[0]  # parsing opens no study
    assert reference.run == str(runs / "ps") and reference.trial is None and not reference.resolved
    with pytest.raises(EvomergeError, match=r"unfinished \(2 of 3 trials complete\)"):
        resolve_sources(parse_search_space(dfs, source="dfs.yaml"))
    dfs["dfs"]["sources"][0]["trial"] = 1
    chosen = resolve_sources(parse_search_space(dfs, source="dfs.yaml")).dfs.sources[0]
    assert chosen.trial == 1 and chosen.recipe == open_existing_study(runs / "ps").trials[1].user_attrs["recipe"]
    del dfs["dfs"]["sources"][0]["trial"]
    assert main(["resume", str(runs / "ps"), "--no-progress"]) == 0  # finish it

    dfs_file = write_yaml(tmp_path / "dfs.yaml", dfs)
    assert main(["search", str(dfs_file), "--runs-root", str(runs), "--no-progress"]) == 0
    study = open_existing_study(runs / "dfs")
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    assert [t.user_attrs["path_text"] for t in trials[:2]] == ["ps[0:4]", "lang[0:4]"]  # the sources alone first
    assert all(len(t.user_attrs["path"]["layers"]) <= 6 for t in trials)
    assert main(["validate", str(runs / "dfs"), "--top", "2"]) == 0
    assert main(["search", str(dfs_file), "--runs-root", str(runs), "--no-progress"]) == 0  # resumes: budget met
    assert len(open_existing_study(runs / "dfs").get_trials(deepcopy=False)) == len(trials)
    # the source resolved at the start is the run's winner, the trial `evomerge export runs/ps` exports,
    # and the data-flow run's folder pins it: the source run may change, the data-flow run keeps its merge
    pinned = load_run_space(runs / "dfs").dfs.sources[0].trial
    assert pinned == Ranking.of(load_run_space(runs / "ps")).winner(open_existing_study(runs / "ps")).trial.number
    assert main(["resume", str(runs / "ps"), "--trials", "5", "--no-progress"]) == 0
    assert main(["validate", str(runs / "ps"), "--top", "3"]) == 0
    assert main(["resume", str(runs / "dfs"), "--trials", str(len(trials) + 1), "--no-progress"]) == 0
    assert main(["search", str(dfs_file), "--runs-root", str(runs), "--no-progress",
                 "--trials", str(len(trials) + 1)]) == 0  # the unpinned file: the folder's pin holds
    assert load_run_space(runs / "dfs").dfs.sources[0].trial == pinned
    trials = sorted(open_existing_study(runs / "dfs").get_trials(deepcopy=False), key=lambda t: t.number)

    shipped = yaml.safe_load((REPO / "search_spaces" / "ps_dfs_demo.yaml").read_text().replace("runs/zoo", str(zoo_dir)))
    shipped["dfs"]["sources"] = [dict(s, source=str(runs / "ps")) if isinstance(s, dict) else s
                                 for s in shipped["dfs"]["sources"]]
    shipped["benchmarks"] = [b for b in shipped["benchmarks"] if Path(b["path"]).exists()]
    assert parse_search_space(shipped, source="ps_dfs_demo.yaml").dfs.sources[0].run == str(runs / "ps")

    best = max((t for t in trials if t.values), key=lambda t: t.values[0])
    out = export_trial(runs / "dfs", trial_number=best.number, out_dir=tmp_path / "best")
    documents = list(yaml.safe_load_all((out / "mergekit.yaml").read_text()))
    assert documents[0]["name"] == "ps" and documents[-1]["merge_method"] == "passthrough"
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    space = load_search_space(runs / "dfs" / "space.yaml")
    from evomerge.search.candidates import make_builder

    builder = make_builder(space)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, builder.rebuild(best.user_attrs)(ids).logits,
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(EvomergeError, match="device memory budget"):  # the PS merge is re-made within the budgets
        make_builder(space.with_memory(device_memory=1000))


def test_tied_embeddings_export_and_mergekit(tmp_path):
    """Tied models (e.g. SmolLM2): the head is the first source's embedding, in memory, export and mergekit."""
    pytest.importorskip("mergekit")
    from transformers import AutoModelForCausalLM

    from tiny_models import write_tiny_expert

    base = write_tiny_llama(tmp_path / "base", tiny_llama_config(num_layers=2, tied=True))
    paths = {n: write_tiny_expert(base, tmp_path / n, seed=seed, noise=0.05) for n, seed in (("a", 1), ("b", 2))}
    pool = LayerPool({n: AutoModelForCausalLM.from_pretrained(str(p)).eval() for n, p in paths.items()})
    path = DataFlowPath([("a", 0), ("b", 1), ("b", 1)], [1.0, 1.0, 1.0])
    out = export_path(pool, path, tmp_path / "export", tokenizer=None, model_refs={n: str(p) for n, p in paths.items()})
    ids = torch.randint(3, 64, (1, 8))
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(str(out)).eval()(ids).logits, pool.assemble(path)(ids).logits)
    theirs = run_mergekit((out / "mergekit.yaml").read_text(), tmp_path / "mergekit")
    ours = open_model(out).load()
    assert set(ours) == set(theirs) and all(torch.equal(ours[n], theirs[n]) for n in ours)


def test_two_workers_share_one_dfs_study(zoo_dir, tmp_path):
    """Two worker processes run a data-flow search on one study."""
    import optuna

    from search_processes import run_search_workers

    run_search_workers(write_yaml(tmp_path / "dfs.yaml", dfs_raw(zoo_dir, max_layers=6)), tmp_path / "runs")
    from evomerge.search.runs import open_existing_study

    trials = [t for t in open_existing_study(tmp_path / "runs" / "dfs").get_trials(deepcopy=False)
              if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) >= 4
    assert all(len(t.user_attrs["path"]["layers"]) <= 6 for t in trials)
    assert len({t.user_attrs["path_text"] for t in trials}) >= 2  # the sources alone, then searched paths
