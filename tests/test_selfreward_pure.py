"""Model-free pieces of the self-rewarding loop: score parsing, prompt filtering, pair building."""

import pytest

from srlm.selfreward.pairs import build_pairs, positive_examples
from srlm.selfreward.prompt_filter import PromptFilter, extract_new_prompt, normalise_prompt, similarity
from srlm.inference.scoring import parse_score, score_bin

# -- scoring ----------------------------------------------------------------------------------------
PARSE_TABLE = [
    ("The answer is relevant and complete.\nScore: 4", 4.0),
    ("score: 4/5", 4.0),
    ("Score: 4.5", 4.5),
    ("**Score:** 4", 4.0),
    ("**Score**: 3", 3.0),
    ("Score: **2**", 2.0),
    ("Score - 3", 3.0),
    ("Score = 1", 1.0),
    ("Score: 4 points", 4.0),
    ("Final score: 3", 3.0),
    ("Score: 4 out of 5", 4.0),
    ("Score: 0", 0.0),
    ("Score: 5.", 5.0),
    ("Total score is 2", 2.0),
    ("Score: 2\nOn reflection it deserves more.\nScore: 5", 5.0),  # last occurrence wins
    ("Score: 4\nThe score is based on relevance and clarity.", 4.0),  # prose is not a label
    ("A score-based view. Score: 1", 1.0),
    # echoed rubric: the only label holds a placeholder, not a number
    ("The rubric says Score: <points>, so I will follow it.", None),
    ("Score: 3\nend with a line of the form \"Score: <points>\"", None),  # last label is the echo
    ("Score: 7", None),  # out of range
    ("Score: 8/10", None),  # another scale: not rescaled
    ("Score: 5/10", None),
    ("Score: -1", None),
    ("Score: 3-4", None),  # a range is ambiguous
    ("I think this response is good, 4 points.", None),
    ("", None),
]


@pytest.mark.parametrize("text,expected", PARSE_TABLE)
def test_parse_score_table(text, expected):
    assert parse_score(text) == expected


def test_parse_score_other_scale():
    assert parse_score("Score: 8/10", max_score=10) == 8.0
    assert parse_score("Score: 7", max_score=10) == 7.0
    assert parse_score("Score: 11", max_score=10) is None


def test_score_bin_rounds_half_up():
    assert [score_bin(s) for s in (0.0, 2.5, 2.49, 4.0, 5.0, 4.666)] == [0, 3, 2, 4, 5, 5]


# -- prompt extraction and filtering ---------------------------------------------------------------
@pytest.mark.parametrize("generated,expected", [
    ("Write a haiku about the sea.", "Write a haiku about the sea."),
    ("New task: Write a haiku about the sea.\n\nTask: Explain gravity.", "Write a haiku about the sea."),
    ("Task: Plan a weekend in Rome.\nInclude a budget.\nTask: something else", "Plan a weekend in Rome.\nInclude a budget."),
    ('1. "How do I bake sourdough bread?"', "How do I bake sourdough bread?"),
    ("- Compare Python and Rust.\nExample 2: more", "Compare Python and Rust."),
    ("**New task:** Describe a cat.\nAnswer: A cat is a small mammal.", "Describe a cat."),
    ("\u201cSummarise the plot of Hamlet", "Summarise the plot of Hamlet"),
    ("Question everything: write an essay on doubt.", "Question everything: write an essay on doubt."),
    ("   \n\n  ", None),
    ("New task:  ", None),
])
def test_extract_new_prompt(generated, expected):
    assert extract_new_prompt(generated) == expected


def test_normalise_prompt():
    assert normalise_prompt("  Don't   PANIC!!  It's\tfine.  ") == "dont panic its fine"
    assert normalise_prompt("What is 2+2?") == "what is 2 2"


SEEDS = [
    "Explain how photosynthesis works in plants and why it matters for life on Earth.",
    "Write a short poem about the ocean at night.",
    "What are the main differences between a virus and a bacterium?",
    "Give me three tips for improving my sleep.",
]


def test_filter_drops_few_shot_echo():
    f = PromptFilter(SEEDS)
    shown = [SEEDS[0], "Suggest a name for a bakery that sells only croissants and coffee."]
    # the shown example itself, with cosmetic changes
    assert f.check("Explain how photosynthesis works in plants, and why it matters for life on earth!", shown) == "echo"
    # a shown example that is not a seed is still an echo
    assert f.check("Suggest a name for a bakery that sells only croissants and coffee", shown) == "echo"
    # a truncated copy of a shown example
    assert f.check("Suggest a name for a bakery that sells", shown) == "echo"
    assert f.counts["echo"] == 3 and f.counts["kept"] == 0
    assert len(f) == 0


def test_filter_seed_duplicate_and_keeps_new():
    f = PromptFilter(SEEDS)
    assert f.check("What are the main differences between a virus and a bacterium") == "seed_duplicate"
    assert f.check("Give me three tips for improving my sleep, please.") == "seed_duplicate"  # 6 of 7 3-grams
    # a word changed mid-sentence breaks three of six 3-grams (Jaccard 3/9): kept
    assert f.check("Give me three ideas for improving my sleep.", ["Name a colour."]) is None
    # the last word changed breaks only one (5/7 >= 0.7): still a near-duplicate at the default threshold
    assert f.check("Give me three tips for improving my diet.") == "seed_duplicate"
    assert f.check("Describe the water cycle to a ten-year-old child.", [SEEDS[1]]) is None
    assert f.counts == {"kept": 2, "empty": 0, "too_short": 0, "too_long": 0, "not_a_task": 0, "echo": 0,
                        "seed_duplicate": 3, "duplicate": 0}


def test_filter_near_duplicate_dedupe():
    f = PromptFilter(SEEDS)
    base = "Write a persuasive letter to my landlord asking him to fix the broken heating before winter."
    assert f.check(base) is None
    assert f.check(base) == "duplicate"  # exact
    assert f.check(base.upper().replace(".", "!")) == "duplicate"  # equal after normalising
    near = "Write a persuasive letter to my landlord asking him to fix the broken heating before the winter."
    assert similarity(base, near) >= 0.7
    assert f.check(near) == "duplicate"
    different = "Write a persuasive letter to my city council asking them to build a new bike lane downtown."
    assert similarity(base, different) < 0.7
    assert f.check(different) is None
    assert f.counts["kept"] == 2 and f.counts["duplicate"] == 3


def test_filter_short_near_duplicates():
    f = PromptFilter([])
    assert f.check("Define entropy simply.") is None
    assert f.check("Define entropy, simply!") == "duplicate"
    assert f.check("Define entropy simply, please.") == "duplicate"  # 3 of 4 words shared: 0.75
    assert f.check("Define enthalpy precisely.") is None


def test_filter_basic_rejections():
    f = PromptFilter(SEEDS, min_chars=10, max_chars=80)
    assert f.check("") == "empty"
    assert f.check(None) == "empty"
    assert f.check("Hi there") == "too_short"
    assert f.check("Tell me a story " * 10) == "too_long"
    assert f.check("1234 5678 90 == 42 ???") == "not_a_task"
    assert f.check("Rate this answer. Score: 4") == "not_a_task"
    assert f.check("Answer the <question> below") == "not_a_task"
    assert sum(f.counts.values()) == 7 and f.counts["kept"] == 0


def test_filter_remember_makes_duplicates_without_counting():
    f = PromptFilter(SEEDS)
    f.remember("List five uses of baking soda around the house.")
    assert f.counts["kept"] == 0 and len(f) == 1
    assert f.check("List five uses of baking soda around the house") == "duplicate"


def test_filter_scales_to_thousands():
    import random
    import time

    rng = random.Random(0)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6)) for _ in range(3000)]
    prompts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 25))) for _ in range(5000)]
    f = PromptFilter([])
    start = time.time()
    for p in prompts:
        f.check(p)
    assert time.time() - start < 10
    assert f.counts["kept"] > 4900


def test_filter_rejects_bad_threshold():
    with pytest.raises(ValueError):
        PromptFilter([], near_dup_threshold=0.0)


# -- pairs -----------------------------------------------------------------------------------------
def cands(prompt_id, scores, start=0):
    return [{"prompt_id": prompt_id, "prompt": f"prompt {prompt_id}", "candidate_id": f"{prompt_id}-c{start + k}",
             "response": f"resp {prompt_id} {start + k}", "score": s} for k, s in enumerate(scores)]


def test_pairs_best_vs_worst_and_unscored_never_rejected():
    pairs, stats = build_pairs(cands("a", [None, 2.0, 4.0]) + cands("b", [None, 3.0]))
    assert pairs == [{"id": "a", "prompt": "prompt a", "chosen": "resp a 2", "rejected": "resp a 1",
                      "chosen_id": "a-c2", "rejected_id": "a-c1", "score_chosen": 4.0, "score_rejected": 2.0}]
    assert stats == {"prompts": 2, "pairs": 1, "dropped_tie": 0, "dropped_too_few_scored": 1,
                     "dropped_identical": 0, "dropped_unfinished": 0, "unscored_candidates": 2,
                     "unfinished_not_chosen": 0, "length_controlled": 0, "chosen_chars": 8.0, "rejected_chars": 8.0,
                     "length_ratio": 1.0}


def test_pairs_ties_dropped_and_margin():
    pairs, stats = build_pairs(cands("t", [3.0, 3.0, 3.0, None]) + cands("m", [3.0, 3.5]) + cands("n", [1.0, 5.0]),
                               min_margin=0.5)
    assert [p["id"] for p in pairs] == ["n"]
    assert stats["dropped_tie"] == 2 and stats["pairs"] == 1
    pairs, stats = build_pairs(cands("m", [3.0, 3.5]))
    assert len(pairs) == 1 and stats["dropped_tie"] == 0
    pairs, stats = build_pairs(cands("t", [4.0, 4.0]))
    assert pairs == [] and stats["dropped_tie"] == 1
    with pytest.raises(ValueError):
        build_pairs([], min_margin=-1)


def test_pairs_deterministic_tie_break_and_nan():
    group = cands("p", [5.0, 1.0, 5.0, 1.0, 3.0, float("nan")], start=8)  # ids p-c8 .. p-c13
    for order in (group, group[::-1]):
        (pair,), stats = build_pairs(order)
        assert pair["chosen_id"] == "p-c8" and pair["rejected_id"] == "p-c9"  # c8 < c10 numerically
        assert stats["unscored_candidates"] == 1


def test_positive_examples():
    data = cands("a", [5.0, 4.67, 4.33, None]) + cands("b", [4.5])
    assert [e["id"] for e in positive_examples(data)] == ["a-c0", "a-c1", "b-c0"]
    assert positive_examples(data, min_score=5.0) == [{"id": "a-c0", "prompt": "prompt a", "response": "resp a 0"}]


def test_pairs_never_pair_identical_responses():
    """Regression: two candidates with the same text (after strip) and different scores gave chosen == rejected,
    which the DPO reader refuses. Identical texts are one response: their scores are averaged."""
    same = cands("s", [5.0, 1.0, 2.0])
    same[0]["response"], same[1]["response"] = "Same answer.", "  Same answer.\n"  # scored 5 and 1: mean 3
    only_same = cands("o", [4.0, 1.0])
    only_same[1]["response"] = only_same[0]["response"] + " "
    pairs, stats = build_pairs(same + only_same)
    assert all(p["chosen"].strip() != p["rejected"].strip() for p in pairs)
    assert [(p["id"], p["chosen_id"], p["rejected_id"]) for p in pairs] == [("s", "s-c0", "s-c2")]
    assert pairs[0]["score_chosen"] == 3.0 and pairs[0]["score_rejected"] == 2.0
    assert stats["dropped_identical"] == 1 and stats["pairs"] == 1 and stats["dropped_tie"] == 0


def test_pairs_unfinished_never_chosen_but_may_be_rejected():
    """Regression: a candidate cut at max_new_tokens could be chosen (DPO then taught stopping mid-sentence)."""
    group = cands("u", [5.0, 3.0, 1.0])
    group[0]["finished"] = group[2]["finished"] = False  # the best and the worst were cut
    (pair,), stats = build_pairs(group)
    assert (pair["chosen_id"], pair["rejected_id"]) == ("u-c1", "u-c2")
    assert pair["rejected_finished"] is False and "chosen_finished" not in pair
    assert stats["unfinished_not_chosen"] == 1
    # only cut responses, or a finished one that is not better: nothing to choose
    cut = cands("c", [4.0, 2.0])
    for c in cut:
        c["finished"] = False
    low = cands("l", [1.0, 4.0])
    low[1]["finished"] = False
    pairs, stats = build_pairs(cut + low)
    assert pairs == [] and stats["dropped_unfinished"] == 2 and stats["unfinished_not_chosen"] == 2
    # allowed on request: the pair then says so
    (pair,), _ = build_pairs(group, allow_unfinished_chosen=True)
    assert (pair["chosen_id"], pair["chosen_finished"], pair["rejected_finished"]) == ("u-c0", False, False)
    # finished responses are unaffected, and an unfinished one is never a positive example
    assert positive_examples(group, min_score=3.0) == [{"id": "u-c1", "prompt": "prompt u", "response": "resp u 1"}]


# -- length control (Meta-Rewarding) ---------------------------------------------------------------
def _cands(*rows):
    return [{"prompt_id": "p", "prompt": "q", "candidate_id": f"c{i}", "response": text, "score": score,
             "finished": finished} for i, (text, score, finished) in enumerate(rows)]


def test_length_control_chooses_the_shortest_near_best():
    from srlm.selfreward.pairs import build_pairs

    rows = _cands(("a long and thorough answer", 4.8, True), ("short", 4.5, True), ("tiny", 4.4, False),
                  ("bad answer here", 1.0, True), ("mid", 3.0, True))
    plain, stats = build_pairs(rows)
    assert plain[0]["chosen"] == "a long and thorough answer" and stats["length_controlled"] == 0
    (pair,), stats = build_pairs(rows, length_control=0.5)
    # "tiny" is shorter and near the best but was cut: never chosen; "mid" is too far below the best
    assert pair["chosen"] == "short" and pair["score_chosen"] == 4.5 and pair["rejected"] == "bad answer here"
    assert stats["length_controlled"] == 1
    assert stats["chosen_chars"] == 5.0 and stats["rejected_chars"] == 15.0 and stats["length_ratio"] == round(5 / 15, 3)
    (pair,), _ = build_pairs(rows, length_control=0.0)  # margin 0: only the best itself qualifies
    assert pair["chosen"] == "a long and thorough answer"


def test_length_control_keeps_the_margin_rule():
    from srlm.selfreward.pairs import build_pairs

    rows = _cands(("long answer text", 3.0, True), ("s", 2.2, True), ("worst one", 2.0, True))
    pairs, stats = build_pairs(rows, length_control=1.0, min_margin=0.5)
    # the shortest near-best ("s", 2.2) beats the worst by only 0.2: dropped as a tie, never a weak pair
    assert pairs == [] and stats["dropped_tie"] == 1
    with pytest.raises(ValueError, match="length_control"):
        build_pairs(rows, length_control=-1)


def test_anchored_rejection_rejects_only_the_anchor_samples():
    from srlm.selfreward.pairs import build_pairs

    rows = _cands(("current best", 4.0, True), ("current worst", 1.0, True))
    rows += [{**r, "candidate_id": f"a{i}", "anchor": True}
             for i, r in enumerate(_cands(("anchor good", 4.5, True), ("anchor bad", 2.0, True)))]
    (pair,), _ = build_pairs(rows, anchored=True)
    # the anchor's 4.5 is never chosen and the current 1.0 never rejected
    assert (pair["chosen"], pair["rejected"]) == ("current best", "anchor bad")
    (plain,), _ = build_pairs(rows)  # without anchoring every candidate competes
    assert (plain["chosen"], plain["rejected"]) == ("anchor good", "current worst")
