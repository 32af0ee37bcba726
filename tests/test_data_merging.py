"""Merges that learn from data: RegMean and Fisher merging (statistics of each expert on unlabelled prompts),
AdaMerging (coefficients descended on the entropy of the merged model's answers), and their place in a search."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from evomerge.cli import main
from evomerge.errors import EvomergeError
from evomerge.merge import MergeCore, Recipe
from evomerge.merge.statistics import KINDS, StatisticsFiles, linear_weights

sys.path.insert(0, str(Path(__file__).parent))
from small_space import small_space  # noqa: E402
from tiny_models import write_tiny_family  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    base, experts = write_tiny_family(root, num_experts=2, sharded_expert=None, num_layers=2)
    return base, experts


def random_grams(core: MergeCore, seed: int) -> list[dict]:
    """A symmetric positive definite Gram per linear weight and expert (as collection would save them)."""
    generator = torch.Generator().manual_seed(seed)
    grams = []
    for _ in range(core.num_experts):
        per_expert = {}
        for slot in core.slots:
            if len(slot.shape) == 2 and "embed" not in slot.name:
                x = torch.randn(3 * slot.shape[1], slot.shape[1], generator=generator)
                per_expert[slot.name] = x.T @ x / len(x)
        grams.append(per_expert)
    return grams


def test_regmean_equals_its_closed_form(family, tmp_path):
    """Every linear weight is (sum_i W_i G_i)(sum_i G_i)^-1 (a direct numpy solve), with RegMean's
    off-diagonal scale applied to each Gram; other tensors are the (weighted) average."""
    base, experts = family
    files = StatisticsFiles(tmp_path / "statistics")
    core = MergeCore(base, experts, device="cpu", statistics=files)
    grams = random_grams(core, seed=3)
    for e, per_expert in enumerate(grams):
        files.save("gram", e, per_expert, {"test": e})
    weights, alpha = [0.7, 1.3], 0.6
    merged = core.merge(Recipe("regmean", {"weight": weights, "alpha": alpha}))
    models = [AutoModelForCausalLM.from_pretrained(str(p)).state_dict() for p in experts]
    checked = 0
    for slot in core.slots:
        name = slot.name
        thetas = [m[name].double().numpy() for m in models]
        if name in grams[0]:
            scaled = []
            for e in range(2):
                g = grams[e][name].double().numpy()
                scaled.append(alpha * g + (1 - alpha) * np.diag(np.diag(g)))
            numerator = sum(w * t @ g for w, t, g in zip(weights, thetas, scaled))
            expected = np.linalg.solve(sum(w * g for w, g in zip(weights, scaled)).T, numerator.T).T
            checked += 1
        else:
            expected = sum(w * t for w, t in zip(weights, thetas)) / sum(weights)
        np.testing.assert_allclose(merged[name].double().numpy(), expected, rtol=1e-4, atol=1e-5, err_msg=name)
    assert checked == 2 * 7 + 1  # q k v o gate up down per layer, and the head
    one = core.merge(Recipe("regmean", {"weight": [1.0, 0.0]}))  # one expert alone: that expert
    for name, tensor in models[0].items():
        torch.testing.assert_close(one[name], tensor, rtol=1e-4, atol=1e-5)


def test_fisher_merge_by_hand(family, tmp_path):
    base, experts = family
    files = StatisticsFiles(tmp_path / "statistics")
    core = MergeCore(base, experts, device="cpu", statistics=files)
    generator = torch.Generator().manual_seed(5)
    fishers = [{s.name: torch.rand(s.shape, generator=generator) ** 4 for s in core.slots} for _ in range(2)]
    for e, per_expert in enumerate(fishers):
        per_expert["model.norm.weight"] = torch.zeros_like(per_expert["model.norm.weight"])  # no prompt reached it
        files.save("fisher", e, per_expert, {"test": e})
    merged = core.merge(Recipe("fisher", {"weight": [2.0, 1.0], "min_fisher": 1e-6}))
    models = [AutoModelForCausalLM.from_pretrained(str(p)).state_dict() for p in experts]
    name = "model.layers.1.mlp.down_proj.weight"
    f0, f1 = fishers[0][name][0, :3].double() + 1e-6, fishers[1][name][0, :3].double() + 1e-6
    t0, t1 = models[0][name][0, :3].double(), models[1][name][0, :3].double()
    by_hand = (2 * f0 * t0 + f1 * t1) / (2 * f0 + f1)
    torch.testing.assert_close(merged[name][0, :3].double(), by_hand, rtol=1e-5, atol=1e-6)
    average = (2 * models[0]["model.norm.weight"] + models[1]["model.norm.weight"]) / 3  # zero Fisher: the average
    torch.testing.assert_close(merged["model.norm.weight"], average, rtol=1e-5, atol=1e-6)


def test_collected_statistics_are_the_quantities_they_name(family):
    base, _ = family
    model = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    prompts = [[1, 5, 9, 13], [2, 6, 7], [3, 4, 8, 10, 11]]
    grams = KINDS["gram"].collect(model, prompts, pad_id=0, batch_size=2)
    assert set(grams) == set(linear_weights(model))
    hidden = []  # the head reads the final norm's output: its Gram is H^T H / tokens
    with torch.no_grad():
        for prompt in prompts:
            hidden.append(model(input_ids=torch.tensor([prompt]), output_hidden_states=True).hidden_states[-1][0])
    h = torch.cat(hidden)
    torch.testing.assert_close(grams["lm_head.weight"], h.T @ h / len(h), rtol=1e-5, atol=1e-6)

    fisher = KINDS["fisher"].collect(model, prompts[:1], pad_id=0, seed=7)
    logits = model(input_ids=torch.tensor([prompts[0]])).logits[0, -1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    token = int(torch.multinomial(logp.detach().exp(), 1, generator=torch.Generator().manual_seed(7)))
    model.zero_grad()
    logp[token].backward()
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(fisher[name], dict(model.named_parameters())[name].grad.pow(2), rtol=1e-5, atol=1e-9)


def data_space(zoo_dir: Path, path: Path, name: str, method: str, **sections) -> Path:
    """The small space on the quick zoo, each benchmark reading the zoo's unlabelled prompts."""
    merge = {"method": method, "granularity": sections.pop("granularity", "global")}
    if method == "task_arithmetic":
        merge["params"] = {"weight": [0.0, 1.5]}
    small_space(zoo_dir, path, name=name, merge=merge, data={"prompts": 16}, **sections)
    raw = yaml.safe_load(path.read_text())
    for bench in raw["benchmarks"]:
        bench["data"] = str(zoo_dir / "data" / f"{bench['name']}.jsonl")
    if method != "task_arithmetic":
        raw["merge"].pop("params", None)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_a_regmean_search_collects_once_and_exports_without_a_mergekit_yaml(zoo_dir, tmp_path, monkeypatch, capsys):
    space = data_space(zoo_dir, tmp_path / "space.yaml", "rm", "regmean", optimizer={"trials": 3})
    calls = []
    real = KINDS["gram"].collect
    monkeypatch.setattr(KINDS["gram"], "collect", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_dir = tmp_path / "run"
    assert main(["search", str(space), "--run-dir", str(run_dir), "--no-progress"]) == 0
    assert len(calls) == 2 and sorted(p.name for p in (run_dir / "statistics" / "gram").iterdir()) == [
        "expert0.safetensors", "expert1.safetensors"]
    assert main(["resume", str(run_dir), "--trials", "4", "--no-progress"]) == 0
    assert len(calls) == 2  # reused, not collected again
    out = tmp_path / "merged"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert not (out / "mergekit.yaml").exists()
    assert "mergekit has no `regmean` merge" in (out / "README.md").read_text()


def test_a_data_informed_method_without_data_is_refused_before_loading(zoo_dir, tmp_path, capsys):
    space = small_space(zoo_dir, tmp_path / "space.yaml", name="nodata", merge={"method": "fisher", "params": {}})
    raw = yaml.safe_load(space.read_text())
    raw["merge"].pop("params")
    space.write_text(yaml.safe_dump(raw))
    assert main(["search", str(space), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "merge method 'fisher' reads unlabelled prompts: give a benchmark a `data:` source" in capsys.readouterr().err


def learner_for(zoo_dir, tmp_path, granularity="layer"):
    from evomerge.search.learning import CoefficientLearner
    from evomerge.search.run import MergeSearch
    from evomerge.search.space import load_search_space

    space = load_search_space(data_space(zoo_dir, tmp_path / f"{granularity}.yaml", f"learn-{granularity}",
                                         "task_arithmetic", granularity=granularity, learn={"steps": 40}))
    search = MergeSearch(space, tmp_path / f"run-{granularity}", progress=False)
    weights = {b.name: b.weight for b in space.benchmarks}
    return CoefficientLearner(search.builder, search.unlabelled(), weights, space.learn, seed=0)


def test_adamerging_gradient_matches_finite_differences(zoo_dir, tmp_path):
    learner = learner_for(zoo_dir, tmp_path)
    batch = learner.sample()
    point = torch.linspace(0.3, 1.1, len(learner.names), dtype=torch.float64)
    coefficients = point.clone().requires_grad_(True)
    learner.loss(coefficients, batch).backward()
    for index in (0, len(learner.names) // 2, len(learner.names) - 1):
        step = torch.zeros_like(point)
        step[index] = 1e-2
        with torch.no_grad():
            numeric = (learner.loss(point + step, batch) - learner.loss(point - step, batch)) / 2e-2
        assert float(coefficients.grad[index]) == pytest.approx(float(numeric), rel=0.05, abs=2e-4), learner.names[index]


def test_adamerging_lowers_the_entropy_on_the_quick_zoo(zoo_dir, tmp_path):
    learner = learner_for(zoo_dir, tmp_path)
    result = learner.learn(progress=False)
    assert np.mean(result.losses[-8:]) < np.mean(result.losses[:8])
    assert all(lo - 1e-9 <= result.genome[n] <= hi + 1e-9 for n, (lo, hi) in
               ((n, learner.builder.genes[n].bounds) for n in learner.names))


def test_a_learned_genome_is_a_trial_and_survives_kill_9(zoo_dir, tmp_path):
    """`evomerge learn` keeps the genome in the study before scoring it; killed while its trial is scored,
    the resume scores it again (it is re-enqueued until a trial of it completes)."""
    space = data_space(zoo_dir, tmp_path / "space.yaml", "learned", "task_arithmetic",
                       optimizer={"name": "cmaes", "trials": 8, "init": "learned", "baselines": False},
                       learn={"steps": 10})
    run_dir = tmp_path / "run"
    marker = tmp_path / "scoring-the-learned-trial"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    worker = subprocess.Popen([sys.executable, str(REPO / "tests" / "_learn_kill_worker.py"), str(space), str(run_dir),
                               str(marker)], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not marker.exists() and worker.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert marker.exists(), worker.stderr.read().decode()[-3000:] if worker.poll() is not None else "timeout"
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    finally:
        if worker.poll() is None:
            worker.kill()
    storage = f"sqlite:///{run_dir / 'study.db'}"
    study = optuna.load_study(study_name="learned", storage=storage)
    learned = study.user_attrs["evomerge_learned"]["adamerging (task-wise)"]["genome"]
    assert main(["resume", str(run_dir), "--no-progress"]) == 0
    study = optuna.load_study(study_name="learned", storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 8
    mine = [t for t in done if t.user_attrs.get("baseline") == "adamerging (task-wise)"]
    assert len(mine) == 1 and mine[0].params == pytest.approx(learned)


def test_learning_is_refused_for_methods_it_cannot_differentiate(zoo_dir, tmp_path):
    space = data_space(zoo_dir, tmp_path / "space.yaml", "nolearn", "regmean",
                       optimizer={"name": "cmaes", "init": "learned"})
    from evomerge.search.space import load_search_space

    with pytest.raises(EvomergeError, match="optimizer.init: coefficients are learned for task_arithmetic merges"):
        load_search_space(space)


def test_a_search_starts_at_the_methods_defaults(zoo_dir, tmp_path):
    """`optimizer.init: defaults`: RegMean as its authors define it is the first trial and CMA-ES's mean;
    with baselines on, the same point is a named baseline."""
    space = data_space(zoo_dir, tmp_path / "space.yaml", "start", "regmean",
                       optimizer={"name": "cmaes", "trials": 3, "init": "defaults", "baselines": False})
    run_dir = tmp_path / "run"
    assert main(["search", str(space), "--run-dir", str(run_dir), "--no-progress"]) == 0
    study = optuna.load_study(study_name="start", storage=f"sqlite:///{run_dir / 'study.db'}")
    first = study.trials[0]
    assert first.user_attrs["baseline"] == "start: weight 1, alpha 0.9"
    assert set(first.params.values()) == {1.0, 0.9}
    from evomerge.search.candidates import make_builder
    from evomerge.search.space import load_search_space

    raw = yaml.safe_load(space.read_text())
    raw["optimizer"]["baselines"] = True
    space.write_text(yaml.safe_dump(raw))
    baselines = make_builder(load_search_space(space)).baseline_genomes()
    assert baselines["defaults weight 1, alpha 0.9"] == first.params


@pytest.mark.parametrize("init, message", [
    ("defaults", "optimizer.init: task_arithmetic has no default for weight; give the values instead"),
    ({"density": 0.5}, "optimizer.init: 'density' is not a searched parameter of this space"),
    ({"weight": 2.0}, r"optimizer.init: weight: 2.0 must be a number within its range \[0.0, 1.5\]"),
    ("middle", "optimizer.init 'middle' is unknown"),
])
def test_a_start_the_space_cannot_take_is_refused(zoo_dir, tmp_path, init, message):
    from evomerge.search.space import load_search_space

    space = data_space(zoo_dir, tmp_path / "space.yaml", "bad", "task_arithmetic",
                       optimizer={"name": "cmaes", "init": init})
    with pytest.raises(EvomergeError, match=message):
        load_search_space(space)


def test_a_method_gene_with_regmean_collects_its_statistics_and_offers_its_defaults(zoo_dir, tmp_path):
    """`method: [task_arithmetic, regmean]`: the statistics are collected for the regmean trials, and
    RegMean's own merge is a baseline beside task arithmetic's uniform merges."""
    space = data_space(zoo_dir, tmp_path / "space.yaml", "both", "task_arithmetic", optimizer={"trials": 9})
    raw = yaml.safe_load(space.read_text())
    raw["merge"]["method"] = ["task_arithmetic", "regmean"]
    raw["merge"]["params"] = {"weight": [0.0, 1.5], "alpha": [0.5, 1.0]}
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    run_dir = tmp_path / "run"
    assert main(["search", str(space), "--run-dir", str(run_dir), "--no-progress"]) == 0
    study = optuna.load_study(study_name="both", storage=f"sqlite:///{run_dir / 'study.db'}")
    baselines = {t.user_attrs.get("baseline"): t for t in study.trials if t.user_attrs.get("baseline")}
    defaults = baselines["regmean, defaults weight 1, alpha 0.9"]
    assert defaults.state == optuna.trial.TrialState.COMPLETE and defaults.params["method"] == "regmean"
    assert (run_dir / "statistics" / "gram").is_dir()
