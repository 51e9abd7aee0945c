"""IFEval: the real checkers (offline Punkt, langdetect), strict vs loose, metrics, input errors, resume, CLI."""

import json

import pytest

from srlm.evaluation.ifeval import RESPONSES_FILE, METRICS_FILE, ifeval
from srlm.metrics.ifeval import check_response, ifeval_metrics, load_ifeval
from srlm.metrics.offline_punkt import ensure_punkt


def item(*instructions, prompt="Write something.", key=1):
    return {"key": key, "prompt": prompt, "instruction_id_list": [i for i, _ in instructions],
            "kwargs": [kw for _, kw in instructions]}


def strict(it, response):
    return check_response(it, response)["follow_instruction_list"]


# -- (1) the checkers are applied --------------------------------------------------------------------
def test_punkt_works_offline():
    import nltk

    assert ensure_punkt()
    nltk.data.find("tokenizers/punkt_tab/english/")  # NLTK's own tokenizer finds the model, no download
    from if_verifiable.ifeval.instructions_util import count_sentences

    # Punkt knows "Mr." and "Dr." are abbreviations: a regex on ". " would count 5 sentences
    assert count_sentences("Mr. Smith met Dr. Jones in town. They talked. Then they left.") == 3


def test_punkt_model_written_to_a_fresh_cache(tmp_path, monkeypatch):
    import nltk
    import punkt
    from nltk.tokenize.punkt import PunktTokenizer

    import srlm.metrics.offline_punkt as module

    monkeypatch.setenv("SRLM_CACHE", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", [])  # no installed punkt_tab anywhere
    monkeypatch.setattr(module, "_punkt_state", {})
    assert module.ensure_punkt()
    assert (tmp_path / "nltk_data" / "tokenizers" / "punkt_tab" / "english" / "ortho_context.tab").exists()
    loaded, shipped = PunktTokenizer("english")._params, punkt.load_model("english")
    assert loaded.abbrev_types == set(shipped.abbrev_types) and loaded.collocations == set(shipped.collocations)
    assert loaded.sent_starters == set(shipped.sent_starters)
    assert dict(loaded.ortho_context) == dict(shipped.ortho_context)


def test_no_punkt_model_is_a_warning_not_a_crash(tmp_path, monkeypatch, caplog):
    import nltk

    import srlm.metrics.offline_punkt as module

    def broken(language):
        raise ImportError("No module named 'punkt'")

    monkeypatch.setattr(nltk.data, "path", [])
    monkeypatch.setattr(module, "_punkt_state", {})
    monkeypatch.setattr(module, "_install_punkt", broken)
    assert module.ensure_punkt() is False and module.ensure_punkt() is False
    assert sum("no offline Punkt model" in r.message for r in caplog.records) == 1


def test_a_checker_that_cannot_run_is_skipped(monkeypatch):
    from if_verifiable.ifeval import instructions_util

    def no_model(text):
        raise LookupError("Resource punkt_tab not found")

    monkeypatch.setattr(instructions_util, "count_sentences", no_model)
    it = item(("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3}),
              ("punctuation:no_comma", {}))
    out = check_response(it, "One. Two.")
    assert out["follow_instruction_list"] == [None, True] and out["skipped"] == ["length_constraints:number_sentences"]
    m = ifeval_metrics([{**it, **out}])
    assert m["n_skipped"] == 1 and m["n_instructions"] == 1 and m["prompt_level_strict"] == 1.0


def test_sentence_counting_instruction():
    it = item(("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3}))
    assert strict(it, "Mr. Smith went to Washington. He was tired.") == [True]
    assert strict(it, "One. Two. Three. Four.") == [False]
    assert check_response(it, "One. Two. Three. Four.")["skipped"] == []


def test_capital_word_frequency_uses_word_tokenize():
    it = item(("change_case:capital_word_frequency", {"capital_relation": "at least", "capital_frequency": 2}))
    assert strict(it, "This is VERY IMPORTANT. Read it.") == [True]
    assert strict(it, "This is very important. Read it.") == [False]


def test_language_instruction():
    it = item(("language:response_language", {"language": "fr"}))
    french = "Bonjour, je m'appelle Marie et j'habite à Paris avec ma famille depuis dix ans."
    english = "Hello, my name is Mary and I have lived in London with my family for ten years."
    assert strict(it, french) == [True]
    assert strict(it, english) == [False]


def test_several_instruction_types():
    it = item(("punctuation:no_comma", {}),
              ("length_constraints:number_words", {"relation": "at least", "num_words": 5}),
              ("detectable_format:title", {}),
              ("keywords:existence", {"keywords": ["potato"]}),
              ("startend:quotation", {}))
    assert strict(it, '"<<Potatoes>> I like the potato very much"') == [True] * 5
    assert strict(it, "Tomatoes, I like them.") == [False] * 5
    assert strict(it, "") == [False] * 5  # an empty response follows nothing, as in the reference


def test_prompt_dependent_checker():
    prompt = "Repeat this request first: what is a potato?"
    it = item(("combination:repeat_prompt", {"prompt_to_repeat": "What is a potato?"}), prompt=prompt)
    assert strict(it, "What is a potato? A tuber.") == [True]
    assert strict(it, "A tuber.") == [False]


def test_random_checker_arguments_are_seeded():
    import random

    from srlm.metrics.ifeval import build_checker

    # IFEval asks for 6 "!" but the checker only counts letters: it draws one, here always the same one
    kwargs = {"let_relation": "at least", "letter": "!", "let_frequency": 6}
    letters = set()
    for seed in range(5):
        random.seed(seed)
        letters.add(build_checker("keywords:letter_frequency", kwargs, "Pitch an ice cream!", 0)._letter)
        assert random.random() == random.Random(seed).random()  # the global random state is left alone
    assert len(letters) == 1


# -- (2) loose vs strict ------------------------------------------------------------------------------
def test_loose_passes_where_strict_fails():
    it = item(("punctuation:no_comma", {}), ("detectable_format:title", {}))
    response = "Sure, here it is:\n<<My Title>>\nNo commas in this part at all"
    out = check_response(it, response)
    assert out["follow_instruction_list"] == [False, True]  # the chatty first line has a comma
    assert out["follow_instruction_list_loose"] == [True, True]  # removing the first line fixes it
    bold = item(("startend:end_checker", {"end_phrase": "Is there anything else I can help with?"}))
    out = check_response(bold, "Done. **Is there anything else I can help with?**")
    assert out["follow_instruction_list"] == [False] and out["follow_instruction_list_loose"] == [True]


# -- (3) metrics arithmetic ---------------------------------------------------------------------------
def test_metrics_arithmetic():
    rows = [
        {"instruction_id_list": ["a:x", "b:y"], "follow_instruction_list": [True, True],
         "follow_instruction_list_loose": [True, True]},
        {"instruction_id_list": ["a:x", "b:z"], "follow_instruction_list": [False, True],
         "follow_instruction_list_loose": [True, True]},
        {"instruction_id_list": ["c:w"], "follow_instruction_list": [None],  # skipped: out of every count
         "follow_instruction_list_loose": [None]},
        {"instruction_id_list": ["b:y"], "follow_instruction_list": [False], "follow_instruction_list_loose": [False]},
    ]
    m = ifeval_metrics(rows)
    assert m["n_prompts"] == 3 and m["n_instructions"] == 5 and m["n_skipped"] == 1
    assert m["prompt_level_strict"] == pytest.approx(1 / 3)
    assert m["prompt_level_loose"] == pytest.approx(2 / 3)
    assert m["inst_level_strict"] == pytest.approx(3 / 5)
    assert m["inst_level_loose"] == pytest.approx(4 / 5)
    assert m["by_group"] == pytest.approx({"a": 0.5, "b": 2 / 3}) and m["by_group_n"] == {"a": 2, "b": 3}
    empty = ifeval_metrics([])
    assert empty["prompt_level_strict"] is None and empty["n_prompts"] == 0


# -- (4) bad input --------------------------------------------------------------------------------------
GOOD = {"key": 1, "prompt": "Write a poem.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}


@pytest.mark.parametrize("change, field", [
    ({"prompt": None}, "prompt"),
    ({"kwargs": None}, "kwargs"),
    ({"instruction_id_list": ["punctuation:no_semicolons"]}, "instruction_id_list[0]"),
    ({"kwargs": [{}, {}]}, "kwargs"),
    ({"instruction_id_list": ["length_constraints:number_words"], "kwargs": [{"num_wrds": 3}]}, "kwargs[0]"),
    ({"key": 1}, "key"),  # a duplicate of line 1's key
])
def test_bad_input_names_file_line_field(tmp_path, change, field):
    bad = {**GOOD, "key": 2, **change}
    bad = {k: v for k, v in bad.items() if v is not None}
    path = tmp_path / "ifeval.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError) as err:
        load_ifeval(str(path))
    assert f"{path}:2: field '{field}'" in str(err.value)


def test_shipped_prompts_load():
    items = load_ifeval("seed:ifeval_dev.jsonl")
    assert len(items) == 270 and len({i["key"] for i in items}) == 270
    assert [i["key"] for i in load_ifeval("seed:ifeval_dev.jsonl", max_prompts=3)] == [i["key"] for i in items[:3]]


# -- (5) end to end on the tiny model, and resume -----------------------------------------------------
ROW_FIELDS = {"key", "prompt", "response", "finished", "follow_instruction_list", "follow_instruction_list_loose",
              "instruction_id_list"}


def test_end_to_end_and_resume(tiny_model, tmp_path, monkeypatch):
    from srlm.inference.engine import Engine

    out = tmp_path / "ifeval"
    args = dict(model=tiny_model, output_dir=str(out), max_new_tokens=6, batch_size=2, max_prompts=4)
    metrics = ifeval(**args)
    rows = [json.loads(line) for line in (out / RESPONSES_FILE).read_text().splitlines()]
    assert len(rows) == 4 and all(ROW_FIELDS <= set(r) for r in rows)
    for r in rows:
        n = len(r["instruction_id_list"])
        assert len(r["follow_instruction_list"]) == n == len(r["follow_instruction_list_loose"])
    saved = json.loads((out / METRICS_FILE).read_text())
    for key in ("prompt_level_strict", "inst_level_strict", "prompt_level_loose", "inst_level_loose", "n_prompts",
                "n_instructions", "n_skipped", "by_group", "model", "max_new_tokens", "seconds", "n_truncated"):
        assert key in saved
    assert saved["n_prompts"] == 4 and saved["n_skipped"] == 0 and saved["max_new_tokens"] == 6
    assert saved["model"] == tiny_model and metrics["n_instructions"] == saved["n_instructions"]
    assert saved["n_truncated"] == sum(not r["finished"] for r in rows)

    # a kill after the first batch: the rerun skips it and generates the other one only
    lines = (out / RESPONSES_FILE).read_text().splitlines(keepends=True)
    (out / RESPONSES_FILE).write_text("".join(lines[:2]) + lines[2][:10])  # and a torn third line
    decisions = []
    original = Engine.generate

    def spy(self, prompts, n, cfg, on_batch=None, skip=None, seed=None):
        def recorded(chunk):
            decisions.append(skip(chunk))
            return decisions[-1]
        return original(self, prompts, n, cfg, on_batch=on_batch, skip=recorded, seed=seed)

    monkeypatch.setattr(Engine, "generate", spy)
    ifeval(**args)
    assert decisions == [True, False]
    again = [json.loads(line) for line in (out / RESPONSES_FILE).read_text().splitlines()]
    assert len(again) == 4 and len({r["key"] for r in again}) == 4
    assert {r["key"]: r["response"] for r in again} == {r["key"]: r["response"] for r in rows}  # greedy: same text

    decisions.clear()  # complete: nothing is generated
    ifeval(**args)
    assert decisions == [] and len((out / RESPONSES_FILE).read_text().splitlines()) == 4

    # a rerun on a finished folder re-scores it: a wrong verdict is fixed, a repeated key dropped
    wrong = [dict(r) for r in again]
    wrong[1]["follow_instruction_list"] = [None] * len(wrong[1]["instruction_id_list"])
    (out / RESPONSES_FILE).write_text("".join(json.dumps(r) + "\n" for r in wrong + wrong[:1]))
    assert ifeval(**args)["n_skipped"] == 0 and decisions == []
    assert [json.loads(line) for line in (out / RESPONSES_FILE).read_text().splitlines()] == again


# -- (6) the command line -----------------------------------------------------------------------------
def test_command_line_help(capsys):
    from srlm.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["ifeval", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--max_new_tokens" in text and "--prompts" in text and "--model" in text and "seed:ifeval_dev" in text


@pytest.mark.slow
def test_embedded_model(tmp_path):
    metrics = ifeval(model="embedded:smollm2-135m-instruct", output_dir=str(tmp_path), max_new_tokens=64,
                     max_prompts=4)
    rows = [json.loads(line) for line in (tmp_path / RESPONSES_FILE).read_text().splitlines()]
    assert len(rows) == 4 and all(r["response"].strip() for r in rows)
    assert metrics["n_prompts"] == 4 and metrics["n_skipped"] == 0
    assert 0.0 <= metrics["prompt_level_strict"] <= metrics["prompt_level_loose"] <= 1.0
