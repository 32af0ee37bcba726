"""Benchmarks named by a Hugging Face hub id (``path: openai/gsm8k``), loaded offline from the local caches.

No test reaches the network: a subprocess runs with ``HF_HUB_OFFLINE=1`` and
``HF_HOME`` / ``HF_DATASETS_CACHE`` inside tmp_path, against caches the test
writes the way `datasets` and `huggingface_hub` write them:

* the Arrow cache of ``openai/gsm8k`` (config ``main``), as an online
  ``load_dataset`` leaves it: a packaged builder's ``download_and_prepare``
  into ``<HF_DATASETS_CACHE>/openai___gsm8k/main/0.0.0/<hash>/``;
* a hub-cache snapshot of ``someorg/quiz``, as ``hf download --repo-type dataset``
  leaves it (``<HF_HUB_CACHE>/datasets--someorg--quiz/{refs/main, snapshots/<sha>/}``),
  which `datasets` itself does not read offline;
* nothing for ``nobody/missing``: one error naming the id.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from evomerge.benchmarks import is_hub_id
from evomerge.search.space import _absolute_paths

REPO_ROOT = Path(__file__).resolve().parents[1]

WRITE_CACHES = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from datasets.packaged_modules.json.json import Json

    root = Path(sys.argv[1])
    data = root / "data"
    data.mkdir()
    for split, n in (("test", 3), ("train", 2)):
        with open(data / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"question": f"{split} {i} + 1?", "answer": f"Add one.\\n#### {i + 1}"}) + "\\n")
    # the Arrow cache an online load_dataset("openai/gsm8k", "main") writes
    builder = Json(cache_dir=str(root / "build"), dataset_name="gsm8k", config_name="main",
                   data_files={s: str(data / f"{s}.jsonl") for s in ("test", "train")})
    builder.download_and_prepare(output_dir=os.path.join(os.environ["HF_DATASETS_CACHE"], "openai___gsm8k", "main",
                                                         "0.0.0", "0123abcd"))
    # a snapshot in the hub cache, as `hf download --repo-type dataset someorg/quiz` leaves it
    sha = "0" * 39 + "1"
    repo = Path(os.environ["HF_HOME"]) / "hub" / "datasets--someorg--quiz"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    rows = [{"q": f"{i}+1?", "options": ["no", "yes"], "gold": 1} for i in range(4)]
    (snapshot / "validation.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
""")

READ_OFFLINE = textwrap.dedent("""
    import json
    from evomerge.benchmarks import load_benchmark, load_prompts
    from evomerge.errors import EvomergeError

    out = {}
    bench = load_benchmark("openai/gsm8k", config="main", split="test", preset="gsm8k",
                           fewshot={"n": 1, "split": "train", "seed": 0})
    out["gsm8k"] = [len(bench), bench.source, bench.items[0].prompt, bench.items[0].answer,
                    bench.prompting.shots[0].prompt]
    # data-informed merging's prompts from another split of the same hub dataset, with the entry's config
    out["data"] = [i.prompt for i in load_prompts("openai/gsm8k", "g", {"config": "main", "preset": "gsm8k"}, "train")]
    quiz = load_benchmark("someorg/quiz", split="validation", fields={"prompt": "q", "choices": "options", "label": "gold"})
    out["quiz"] = [len(quiz), quiz.kind, quiz.items[0].prompt, quiz.items[0].label]
    for key, kwargs in (("missing", dict(source="nobody/missing")),
                        ("bad_config", dict(source="openai/gsm8k", config="socratic", split="test")),
                        ("config_local", dict(source=json.__file__, config="main"))):
        try:
            load_benchmark(name="b", **kwargs)
            out[key] = None
        except EvomergeError as error:
            out[key] = str(error)
    print(json.dumps(out))
""")


def _offline_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    return env


def test_hub_ids_load_offline_from_the_local_caches(tmp_path):
    env = _offline_env(tmp_path)
    subprocess.run([sys.executable, "-c", WRITE_CACHES, str(tmp_path)], env=env, check=True, capture_output=True)
    done = subprocess.run([sys.executable, "-c", READ_OFFLINE], env=env, capture_output=True, text=True, cwd=tmp_path,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])

    count, source, prompt, answer, shot = out["gsm8k"]
    assert count == 3 and source == "openai/gsm8k, config main"
    assert prompt == "Question: test 0 + 1?\nAnswer:" and answer.endswith("#### 1")
    assert shot.startswith("Question: train")                 # few-shot examples from the cached train split
    assert out["data"] == ["Question: train 0 + 1?\nAnswer:", "Question: train 1 + 1?\nAnswer:"]
    assert out["quiz"] == [4, "multiple_choice", "0+1?", 1]      # from the hub-cache snapshot
    assert "'nobody/missing' is no local file or folder, and neither reachable on the Hugging Face hub nor in the " \
           "local caches" in out["missing"]
    assert "could not load hub dataset 'openai/gsm8k, config socratic'" in out["bad_config"]
    assert "config applies to hub dataset ids" in out["config_local"]


def test_hub_ids_are_told_from_local_paths(tmp_path):
    (tmp_path / "bench.jsonl").write_text("{}\n")
    assert is_hub_id("openai/gsm8k") and is_hub_id("gsm8k") and is_hub_id("allenai/ai2_arc")
    assert not is_hub_id(str(tmp_path / "bench.jsonl")) and not is_hub_id("missing/bench.jsonl")
    assert not is_hub_id("./data/x") and not is_hub_id("/abs/path") and not is_hub_id("a/b/c")
    raw = {"benchmarks": [{"name": "g", "path": "openai/gsm8k", "config": "main", "data": {"split": "train"}},
                          {"name": "l", "path": "bench/local.jsonl", "data": "bench/prompts.jsonl"},
                          {"name": "h", "path": "bench/local.jsonl", "data": {"path": "someorg/prompts"}}]}
    resolved = _absolute_paths(raw)["benchmarks"]
    assert resolved[0]["path"] == "openai/gsm8k"                    # a hub id stays as written
    assert resolved[1]["path"] == str(Path("bench/local.jsonl").resolve())
    assert resolved[1]["data"] == str(Path("bench/prompts.jsonl").resolve())
    assert resolved[2]["data"] == {"path": "someorg/prompts"}       # data: from a hub id, too
