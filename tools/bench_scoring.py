"""Benchmark scoring speed per item kind: items/s of teacher-forced exact match, multiple choice
and generation, and what generating an answer costs against checking it teacher-forced.

Two settings, each scored through `evomerge.benchmarks` as a search scores them:

* the zoo (tiny character-level Llama experts): every task's benchmark with the
  expert of that task, as the zoo manifest says to score it, and the arith items
  with their right choice as the answer, checked teacher-forced (exact match) and
  generated (greedy until end of sequence, at most 8 new tokens);
* a ~0.3B random Llama (hidden 1024, 16 layers, vocab 32000; float32 on CPU,
  bfloat16 on a GPU) with a word-level tokenizer: prompts of P tokens; exact
  match with answers of N tokens; multiple choice with 4 choices of C tokens;
  generation of exactly N new tokens (end of sequence ignored), so the
  teacher-forced and generated rows do the same amount of answer work.

Prints seconds and items/s per row (median of --repeats after one warm-up
batch) and the generation / teacher-forced cost ratio (seconds per item).

    python tools/bench_scoring.py                                  # zoo at runs/zoo (built if missing) + 0.3B model
    python tools/bench_scoring.py --zoo runs/.cache/zoo-quick-3 --items 32 --new-tokens 32 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.benchmarks import Benchmark, Item, load_benchmark, score_items  # noqa: E402
from evomerge.benchmarks.generation import generate_greedy  # noqa: E402
from evomerge.benchmarks.prompts import prompt_ids  # noqa: E402

RANDOM_MODEL = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16,
                    num_key_value_heads=16, vocab_size=32000, max_position_embeddings=1024)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


class Table:
    def __init__(self):
        self.rows = []

    def add(self, setting, what, items, seconds, note=""):
        self.rows.append((setting, what, items, seconds, note))
        print(f"{setting:<12} {what:<34} {items:>6} {seconds:>9.3f} {items / seconds:>10.1f}  {note}", flush=True)

    @staticmethod
    def header():
        print(f"{'setting':<12} {'scoring':<34} {'items':>6} {'seconds':>9} {'items/s':>10}  shape", flush=True)


def bench_zoo(zoo_dir: Path, device, batch_size: int, repeats: int, table: Table) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.zoo import ensure_zoo
    from evomerge.zoo.build import write_answer_items

    if not (zoo_dir / "zoo.json").is_file():  # an existing zoo (any profile) is used as it is
        zoo_dir = ensure_zoo(zoo_dir, progress=True)
    manifest = json.loads((zoo_dir / "zoo.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(zoo_dir / "base")
    options = manifest.get("benchmarks", {})
    per_item = {}
    for task, expert in manifest["experts"].items():  # composite tasks have no expert to score them with
        rel = manifest["bench"][task]
        model = AutoModelForCausalLM.from_pretrained(zoo_dir / expert).to(device).eval()
        benches = {task: load_benchmark(zoo_dir / rel, name=task, **options.get(task, {}))}
        if task == "arith":  # its multiple-choice items with the right choice as the answer: checked, then generated
            with tempfile.TemporaryDirectory() as folder:
                answers = write_answer_items(zoo_dir / rel, Path(folder) / "arith.jsonl")
                benches["arith (exact match)"] = load_benchmark(answers, name=task)
                benches["arith (generate)"] = load_benchmark(answers, name=task, scoring="generate", max_new_tokens=8)
        for label, bench in benches.items():
            score_items(model, tokenizer, bench, indices=range(min(batch_size, len(bench))), batch_size=batch_size)
            seconds = timed(lambda: score_items(model, tokenizer, bench, batch_size=batch_size), device, repeats)
            table.add("zoo", f"{label}: {bench.kind}", len(bench), seconds, f"batch {batch_size}")
            per_item[label] = seconds / len(bench)
    return per_item


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over ``w0 w1 ...``: one token per word, so prompt lengths are exact."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def bench_random_model(args, device, table: Table) -> dict[str, float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    torch.manual_seed(0)
    config = LlamaConfig(**RANDOM_MODEL, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config).to(dtype).to(device).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e9
    tokenizer = word_tokenizer(config.vocab_size)
    rng = random.Random(0)

    def words(n):
        return " ".join(f"w{rng.randrange(config.vocab_size - 4)}" for _ in range(n))

    p, n, c, count = args.prompt_tokens, args.new_tokens, args.choice_tokens, args.items
    exact = Benchmark("em", [Item(f"e{i}", words(p), answer=words(n)) for i in range(count)])
    choice = Benchmark("mc", [Item(f"m{i}", words(p), choices=tuple(words(c) for _ in range(4)), label=0)
                              for i in range(count)])
    prompts = prompt_ids(exact, exact.items, tokenizer)
    setting = f"{params:.2f}B random"

    def generate():
        with torch.inference_mode():
            generate_greedy(model, tokenizer, prompts, n, batch_size=args.batch_size, stop_at_eos=False)

    rows = [("exact match (teacher-forced)", lambda: score_items(model, tokenizer, exact, batch_size=args.batch_size),
             f"P={p}, answer N={n}"),
            ("multiple choice", lambda: score_items(model, tokenizer, choice, batch_size=args.batch_size),
             f"P={p}, 4 choices of C={c}"),
            ("generate", generate, f"P={p}, N={n} new tokens")]
    score_items(model, tokenizer, exact, indices=range(min(4, count)), batch_size=args.batch_size)  # warm-up
    per_item = {}
    for label, fn, shape in rows:
        seconds = timed(fn, device, args.repeats)
        table.add(setting, label, count, seconds, f"{shape}, batch {args.batch_size}, {dtype}".replace("torch.", ""))
        per_item[label] = seconds / count
    return per_item


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="runs/zoo", help="zoo folder (built if missing; default runs/zoo)")
    parser.add_argument("--zoo-batch-size", type=int, default=128, help="the search's scoring batch (default 128)")
    parser.add_argument("--items", type=int, default=64, help="items per kind on the random model")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32, help="answer tokens (exact match) = new tokens (generate)")
    parser.add_argument("--choice-tokens", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16, help="batch on the random model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-zoo", action="store_true")
    parser.add_argument("--skip-random", action="store_true")
    args = parser.parse_args(argv)
    quiet_libraries()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {args.device} ({name}); torch {torch.__version__}", flush=True)
    table = Table()
    Table.header()
    if not args.skip_zoo:
        zoo = bench_zoo(Path(args.zoo), args.device, args.zoo_batch_size, args.repeats, table)
        if "arith (generate)" in zoo:
            print(f"zoo arith: generation / teacher-forced seconds per item = "
                  f"{zoo['arith (generate)'] / zoo['arith (exact match)']:.1f}", flush=True)
    if not args.skip_random:
        big = bench_random_model(args, args.device, table)
        print(f"random model: generation / teacher-forced exact match seconds per item = "
              f"{big['generate'] / big['exact match (teacher-forced)']:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
