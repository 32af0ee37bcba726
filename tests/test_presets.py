"""Dataset presets on hand-written files in each dataset's own column layout; answer extraction and
comparison; benchmark-entry options checked at load time, one error naming benchmark and field."""

from __future__ import annotations

import json

import pytest

from evomerge.benchmarks import GENERATE, MULTIPLE_CHOICE, load_benchmark
from evomerge.benchmarks.answers import Comparison, Extractor, normalize, parse_comparison, parse_extractor
from evomerge.benchmarks.prompts import prompt_texts
from evomerge.errors import EvomergeError


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


# openai/gsm8k (main): question, answer (worked solution ending in "#### N")
GSM8K = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
               "altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
               "$<<0.2*50=10>>10.\n#### 10"},
    {"question": "Betty needs $100 for a wallet and has half of it; her parents give $15 and her grandparents "
                 "twice as much. How much more money does Betty need?",
     "answer": "Betty has 100/2 = $<<100/2=50>>50.\nHer grandparents give 15*2 = $<<15*2=30>>30.\n"
               "She needs 100-50-30-15 = $<<100-50-30-15=5>>5 more.\n#### 5"},
    {"question": "A store sold 1,200 pens on Monday and 1,034 on Tuesday. How many pens in all?",
     "answer": "1,200 + 1,034 = <<1200+1034=2234>>2,234 pens.\n#### 2,234"},
]
# juletxara/mgsm: question, answer (train: worked solution with its own labels; test: null), answer_number, equation_solution
MGSM_TRAIN = [
    {"question": "Question: Roger has 5 tennis balls. He buys 2 more cans of tennis balls. Each can has 3 tennis "
                 "balls. How many tennis balls does he have now?",
     "answer": "Step-by-Step Answer: Roger started with 5 balls. 2 cans of 3 tennis balls each is 6 tennis balls. "
               "5 + 6 = 11. The answer is 11.", "answer_number": 11, "equation_solution": "5 + 6 = 11."},
    {"question": "問題：サーバールームには9台のコンピューターがありました。月曜日から木曜日まで毎日5台ずつ追加されました。"
                 "現在サーバールームには何台のコンピューターがありますか？",
     "answer": "ステップごとの答え：月曜日から木曜日までは4日あります。毎日5台ずつ追加されました。つまり、合計で 4 * 5 = 20 台追加されました。"
               "最初に9台あったので、現在は 9 + 20 = 29 台となります。答えは29です。",
     "answer_number": 29, "equation_solution": "4 * 5 = 20. 9 + 20 = 29."},
]
MGSM_TEST = [
    {"question": "Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins "
                 "for her friends every day with four. She sells the remainder at the farmers' market daily for $2 "
                 "per fresh duck egg. How much in dollars does she make every day at the farmers' market?",
     "answer": None, "answer_number": 18, "equation_solution": None},
    {"question": "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does "
                 "it take?", "answer": None, "answer_number": 3, "equation_solution": None},
]
# allenai/ai2_arc: id, question, choices {text, label}, answerKey (letters, or digits on some rows)
ARC = [
    {"id": "Mercury_SC_415702", "question": "George wants to warm his hands quickly by rubbing them. Which skin "
     "surface will produce the most heat?", "choices": {"text": ["dry palms", "wet palms", "palms covered with oil",
     "palms covered with lotion"], "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
    {"id": "MCAS_2000_4_6", "question": "Which technology was developed most recently?",
     "choices": {"text": ["cellular telephone", "television", "refrigerator", "airplane"],
                 "label": ["1", "2", "3", "4"]}, "answerKey": "1"},
]
# cais/mmlu: question, subject, choices (4 texts), answer (index)
MMLU = [
    {"question": "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.",
     "subject": "abstract_algebra", "choices": ["0", "4", "2", "6"], "answer": 1},
    {"question": "Let p = (1, 2, 5, 4)(2, 3) in S_5 . Find the index of <p> in S_5.", "subject": "abstract_algebra",
     "choices": ["8", "2", "24", "120"], "answer": 2},
]
# Rowan/hellaswag: ind, activity_label, ctx_a, ctx_b, ctx, endings, source_id, split, split_type, label (a digit string)
HELLASWAG = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "endings": [
         "is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
         "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
     "source_id": "activitynet~v_-JhWjGDPHMY", "split": "val", "split_type": "indomain", "label": "3"},
]


def test_gsm8k_preset_generates_and_extracts_hash_answers(tmp_path):
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", GSM8K[:2])
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", GSM8K[2:])
    bench = load_benchmark(tmp_path / "gsm8k", preset="gsm8k", split="test", fewshot={"n": 2, "split": "train"})
    assert bench.kind == GENERATE and bench.name == "gsm8k" and len(bench) == 2
    assert bench.items[0].prompt == f"Question: {GSM8K[2]['question']}\nAnswer:"
    settings = bench.settings
    assert settings.stop == ("\n\n", "Question:") and settings.max_new_tokens == 256
    assert [settings.extract.target(i.answer) for i in bench.items] == ["5", "2,234"]
    assert settings.compare(settings.extract("She needs 5 more.\n#### 5"), "5")
    assert settings.compare(settings.extract("#### 2234"), "2,234")           # thousands separators
    assert not settings.compare(settings.extract("She needs 5 more."), "5")   # no "####": no answer
    # the shots are the train rows (never scored items), with their whole worked solution
    scored = {i.prompt for i in bench.items}
    assert {s.prompt for s in bench.prompting.shots} == {f"Question: {r['question']}\nAnswer:" for r in GSM8K[:2]}
    assert not scored & {s.prompt for s in bench.prompting.shots}
    text = prompt_texts(bench, bench.items[:1], tokenizer=None)[0]
    first = bench.prompting.shots[0]
    assert text.startswith(f"{first.prompt} {first.answer}\n\n") and text.endswith(bench.items[0].prompt)
    again = load_benchmark(tmp_path / "gsm8k", preset="gsm8k", split="test", fewshot={"n": 2, "split": "train"})
    assert again.prompting.shots == bench.prompting.shots   # fixed by seed


def test_mgsm_preset_reads_numbers_and_shows_clean_worked_examples(tmp_path):
    write_jsonl(tmp_path / "mgsm" / "train.jsonl", MGSM_TRAIN)
    write_jsonl(tmp_path / "mgsm" / "test.jsonl", MGSM_TEST)
    bench = load_benchmark(tmp_path / "mgsm", preset="mgsm", split="test", fewshot={"n": 2, "split": "train", "seed": 3})
    assert bench.kind == GENERATE and [i.answer for i in bench.items] == ["18", "3"]
    assert bench.items[0].prompt.startswith("Question: Janet’s ducks") and bench.items[0].prompt.endswith("Step-by-Step Answer:")
    shots = {s.prompt: s.answer for s in bench.prompting.shots}
    assert shots[f"Question: {MGSM_TRAIN[0]['question'][len('Question: '):]}\nStep-by-Step Answer:"].startswith("Roger started")
    assert any(a.startswith("月曜日から") for a in shots.values())   # localized labels stripped too
    settings = bench.settings
    assert settings.compare(settings.extract("She sells 9 eggs at $2: 9 * 2 = 18. The answer is 18."), "18")
    assert not settings.compare(settings.extract("I do not know."), "18")


def test_arc_preset_scores_choice_texts_with_their_own_labels(tmp_path):
    bench = load_benchmark(write_jsonl(tmp_path / "arc.jsonl", ARC), preset="arc")
    assert bench.kind == MULTIPLE_CHOICE and bench.prompting.delimiter == " "
    assert bench.items[0].id == "Mercury_SC_415702" and bench.items[0].label == 0
    assert bench.items[1].label == 0   # answerKey "1" among labels "1".."4" is the first choice
    assert bench.items[1].prompt == "Question: Which technology was developed most recently?\nAnswer:"


def test_mmlu_preset_lists_choices_and_scores_letters(tmp_path):
    import datasets

    datasets.Dataset.from_list(MMLU).to_parquet(str(tmp_path / "mmlu.parquet"))
    bench = load_benchmark(tmp_path / "mmlu.parquet", preset="mmlu")
    assert bench.kind == MULTIPLE_CHOICE
    assert bench.items[0].choices == ("A", "B", "C", "D") and [i.label for i in bench.items] == [1, 2]
    assert bench.items[0].prompt == (f"{MMLU[0]['question']}\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:")


def test_hellaswag_preset_scores_endings(tmp_path):
    bench = load_benchmark(write_jsonl(tmp_path / "hellaswag.jsonl", HELLASWAG), preset="hellaswag")
    item = bench.items[0]
    assert bench.kind == MULTIPLE_CHOICE and item.label == 3 and item.choices == tuple(HELLASWAG[0]["endings"])
    assert item.prompt == "Roof shingle removal: A man is sitting on a roof. he"


def test_entry_options_override_the_preset(tmp_path):
    rows = [{"q": r["question"], "answer": r["answer"]} for r in GSM8K]
    bench = load_benchmark(write_jsonl(tmp_path / "mine.jsonl", rows), preset="gsm8k", template="Q: {q}\nA:",
                           max_new_tokens=64, stop=["\n"], extract="last_number")
    assert bench.items[0].prompt.startswith("Q: Natalia") and bench.settings.max_new_tokens == 64
    assert bench.settings.stop == ("\n",) and bench.settings.extract == Extractor("last_number")
    assert bench.settings.compare.name == "numeric"   # kept from the preset


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize("extractor, text, expected", [
    (Extractor("last_number"), "3 apples and 1,250 pears, so -4.5.", "-4.5"),
    (Extractor("last_number"), "no digits here", None),
    (Extractor("gsm8k"), "so 10 in all.\n#### $1,000", "1,000"),
    (Extractor("gsm8k"), "so 10 in all.", None),
    (Extractor("regex", r"answer is \(?([A-D])\)?"), "The answer is (C).", "C"),
    (Extractor("after", "The answer is"), "so... The answer is 42.\nQuestion: next", "42"),
    (Extractor("after", "Answer:"), "Answer: ", None),
    (Extractor(), "  Paris \n", "Paris"),
    (Extractor(), "", None),
])
def test_extractors(extractor, text, expected):
    assert extractor(text) == expected


def test_comparisons():
    assert normalize(" The  Answer\tIS 1,000 ") == "the answer is 1000"
    assert Comparison()("  paris", "Paris") and not Comparison()("Paris.", "Lyon")
    assert Comparison("numeric")("$1,234.0", "1234") and not Comparison("numeric")("1234.1", "1234")
    assert Comparison("numeric", 0.2)("1234.1", "1234") and not Comparison("numeric")("many", "3")
    assert not Comparison()(None, "3")
    assert parse_comparison({"numeric": 0.01}, "b").tolerance == 0.01
    assert parse_extractor({"after": "=>"}, "b") == Extractor("after", "=>")


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("options, message", [
    ({"extract": {"regex": r"answer is \d+"}}, r"benchmark 'b': extract.regex .* has 0 capture groups"),
    ({"extract": {"regex": r"(\d+)-(\d+)"}}, r"benchmark 'b': extract.regex .* has 2 capture groups"),
    ({"extract": {"regex": r"(unclosed"}}, r"benchmark 'b': extract.regex .* not a valid regular expression"),
    ({"extract": "first_number"}, r"benchmark 'b': extract 'first_number' is unknown"),
    ({"preset": "gsm9k"}, r"benchmark 'b': preset 'gsm9k' is unknown; choose one of gsm8k, mgsm"),
    ({"compare": "fuzzy"}, r"benchmark 'b': compare must be string, numeric"),
    ({"compare": {"numeric": -1}}, r"benchmark 'b': compare.numeric must be a tolerance >= 0"),
    ({"scoring": "generate", "max_new_tokens": 0}, r"benchmark 'b': max_new_tokens must be an integer >= 1"),
    ({"scoring": "generate", "stop": ["", "x"]}, r"benchmark 'b': stop must be a list of non-empty strings"),
    ({"scoring": "exact_match", "stop": ["\n"]}, r"benchmark 'b': stop applies to scoring: generate only"),
    ({"scoring": "ranking"}, r"benchmark 'b': scoring 'ranking' is unknown"),
    ({"fewshot": {"n": 2}}, r"benchmark 'b': fewshot needs exactly one of split .* or path"),
    ({"fewshot": {"n": 2, "split": "train", "shots": 3}}, r"benchmark 'b': unknown key fewshot.shots"),
    ({"chat": "yes"}, r"benchmark 'b': chat must be true or false"),
])
def test_bad_options_fail_at_load_naming_benchmark_and_field(tmp_path, options, message):
    path = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    with pytest.raises(EvomergeError, match=message):
        load_benchmark(path, **options)


def test_preset_with_missing_columns_is_one_error(tmp_path):
    rows = [{"question": "Sky?", "choices": {"text": ["blue", "red"], "label": ["A", "B"]}, "gold": "A"}]
    with pytest.raises(EvomergeError, match=r"benchmark 'arc' .*preset 'arc' reads columns question, choices, "
                                            r"answerKey; the data has no 'answerKey' \(its columns: question, choices, gold\)"):
        load_benchmark(write_jsonl(tmp_path / "arc.jsonl", rows), preset="arc")
    assert load_benchmark(tmp_path / "arc.jsonl", preset="arc", fields={"label": "gold"}).items[0].label == 0


def test_fewshot_never_draws_scored_items(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(3)])
    with pytest.raises(EvomergeError, match=r"fewshot.split: .* is one file, without splits; .*fewshot.path"):
        load_benchmark(path, fewshot={"n": 1, "split": "train"})
    with pytest.raises(EvomergeError, match=r"fewshot.n: asks for 1 examples, but .* has only 0"):
        load_benchmark(path, fewshot={"n": 1, "path": str(path)})
