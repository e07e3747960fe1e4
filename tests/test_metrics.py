"""Answer scores: hand-computed values for each metric, plus properties over random strings."""

import math
import re
import string
from collections import Counter

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from loramem.errors import LoramemError
from loramem.metrics import (
    PHONE_RE,
    bleu,
    exact_match,
    extract_phone,
    mean,
    normalize_answer,
    phone_exact_match,
    rouge_l,
    token_f1,
)

# ASCII words, punctuation and spaces: the alphabet all four metrics tokenise the same way.
answers = st.text(alphabet=st.sampled_from("abcdefghij ABC.,!?-'"), max_size=40)


# --- phone numbers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "phone"),
    [
        ("555-123-4567", "555-123-4567"),
        ("Answer: 555-123-4567.", "555-123-4567"),
        ("first 111-222-3333 then 444-555-6666", "111-222-3333"),
        ("5551234567", None),
        ("555-1234-567", None),
        ("(555) 123-4567", None),
        ("", None),
    ],
)
def test_extract_phone(text, phone):
    assert extract_phone(text) == phone


def test_phone_regex_is_the_documented_pattern():
    assert PHONE_RE.pattern == r"\d{3}-\d{3}-\d{4}"


def test_phone_exact_match_uses_the_first_number_only():
    gold = "555-123-4567"
    assert phone_exact_match(" 555-123-4567\nQuestion: ...", gold)
    assert phone_exact_match("It is 555-123-4567.", "Answer: 555-123-4567")
    assert not phone_exact_match("000-000-0000 or 555-123-4567", gold)
    assert not phone_exact_match("555-123-4568", gold)
    assert not phone_exact_match("I don't know", gold)


def test_phone_exact_match_is_false_when_the_gold_has_no_number():
    assert not phone_exact_match("no number", "no number either")


# --- SQuAD exact match and F1 --------------------------------------------------------------------


def test_normalize_answer_follows_squad():
    assert normalize_answer("  The Eiffel-Tower,  in   PARIS! ") == "eiffeltower in paris"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_exact_match():
    assert exact_match("The Eiffel Tower.", "eiffel tower")
    assert exact_match("", "the")  # both normalise to nothing
    assert not exact_match("Eiffel Tower", "Eiffel Towers")


def test_token_f1_hand_computed():
    # pred tokens: quick brown fox; gold: quick fox jumps; 2 shared -> P = R = 2/3.
    assert token_f1("The quick brown fox", "quick fox jumps") == pytest.approx(2 / 3)
    # pred: paris paris france (3), gold: paris (1); clipped overlap 1 -> P = 1/3, R = 1, F1 = 1/2.
    assert token_f1("Paris, Paris, France", "Paris") == pytest.approx(0.5)
    assert token_f1("blue", "red") == 0.0


def test_token_f1_empty_answers_follow_squad_v2():
    assert token_f1("", "") == 1.0
    assert token_f1("the", "") == 1.0
    assert token_f1("", "paris") == 0.0
    assert token_f1("paris", "") == 0.0


# --- ROUGE-L and BLEU ----------------------------------------------------------------------------


def test_rouge_l_values():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("alpha beta", "gamma delta") == 0.0
    # LCS("a b c d", "a c e") = 2 -> P = 2/4, R = 2/3, F = 4/7.
    assert rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)


def test_rouge_l_stems_offline():
    assert rouge_l("running dogs", "run dog") == 1.0


def test_rouge_l_takes_the_best_reference():
    assert rouge_l("a b c", ["x y", "a b c"]) == 1.0
    assert rouge_l("a b c", ["a c e", "x"]) == pytest.approx(rouge_l("a b c", "a c e"))


def test_bleu_of_an_identical_long_sentence_is_one():
    sentence = "The quick brown fox jumps over the lazy dog near the river bank."
    assert bleu(sentence, sentence) == pytest.approx(1.0)
    assert bleu(sentence, [sentence.upper()]) == pytest.approx(1.0)  # lower-cased tokens


def test_bleu_hand_computed():
    # Precisions 5/6, 2/5, 1/4 and 0/3 smoothed to 0.1/3; brevity penalty exp(1 - 7/6).
    expected = math.exp(1 - 7 / 6) * (5 / 6 * 2 / 5 * 1 / 4 * 0.1 / 3) ** 0.25
    assert bleu("the cat is on the mat", "there is a cat on the mat") == pytest.approx(expected)


def test_bleu_of_disjoint_or_empty_is_zero():
    assert bleu("alpha beta gamma delta", "one two three four") == 0.0
    assert bleu("", "one two three four") == 0.0


@pytest.mark.parametrize("score", [rouge_l, bleu])
def test_scores_need_a_reference(score):
    with pytest.raises(LoramemError, match="at least one reference"):
        score("answer", [])


def test_mean():
    assert mean([]) == 0.0
    assert mean([1.0, 0.0, 0.5]) == pytest.approx(0.5)
    assert mean(float(x) for x in range(3)) == 1.0  # any iterable


# --- properties ----------------------------------------------------------------------------------

# Besides `answers`: any Unicode text, and ASCII words with punctuation.
any_text = st.text(max_size=40)
words = st.text(alphabet=string.ascii_letters + string.digits + " ,.!?'-", max_size=40)
texts = st.one_of(answers, any_text, words)


def squad_normalize(s: str) -> str:
    """normalize_answer as the SQuAD v2 evaluation script writes it."""
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text, flags=re.UNICODE)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def squad_f1(prediction: str, gold: str) -> float:
    """compute_f1 of the SQuAD v2 evaluation script."""
    gold_toks, pred_toks = squad_normalize(gold).split(), squad_normalize(prediction).split()
    common = Counter(gold_toks) & Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision, recall = num_same / len(pred_toks), num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


@settings(max_examples=60, deadline=None, database=None)
@given(texts, texts)
@example("Paris, Paris, France", "paris paris")  # shared words counted with their multiplicity
def test_scores_lie_in_unit_interval(prediction, gold):
    for score in (token_f1(prediction, gold), rouge_l(prediction, gold), bleu(prediction, gold),
                  rouge_l(prediction, [gold, prediction + gold])):
        assert 0.0 <= score <= 1.0 and not math.isnan(score)
    # The SQuAD ones, exactly: as the SQuAD v2 evaluation script computes them.
    assert exact_match(prediction, gold) is (squad_normalize(prediction) == squad_normalize(gold))
    assert token_f1(prediction, gold) == squad_f1(prediction, gold)


@settings(max_examples=60, deadline=None, database=None)
@given(texts)
def test_identical_answers_score_one(text):
    assert exact_match(text, text)
    # SQuAD v2: F1 is 1 for identical answers, including two answers with no tokens.
    assert token_f1(text, text) == 1.0
    if normalize_answer(text).split() and re.search(r"[a-z0-9]", text.lower()):
        # rouge-score only keeps ASCII letters and digits, so ROUGE-L needs one of those.
        assert rouge_l(text, text) == pytest.approx(1.0)
        assert rouge_l(text, ["zzz unrelated", text]) == pytest.approx(1.0)


@settings(max_examples=60, deadline=None, database=None)
@given(texts, texts)
def test_symmetric_scores_and_exact_match_implies_full_f1(a, b):
    assert exact_match(a, b) == exact_match(b, a)
    assert token_f1(a, b) == pytest.approx(token_f1(b, a))
    assert rouge_l(a, b) == pytest.approx(rouge_l(b, a))
    if exact_match(a, b):
        assert token_f1(a, b) == 1.0


@st.composite
def noisy(draw, text):
    """The same answer up to case, punctuation, articles and whitespace."""
    out = "".join(c.swapcase() if draw(st.booleans()) else c for c in text)
    marks = draw(st.lists(st.tuples(st.integers(0, len(out)), st.sampled_from(string.punctuation)), max_size=4))
    for pos, mark in sorted(marks, reverse=True):
        out = out[:pos] + mark + out[pos:]
    out = re.sub(" ", lambda _: draw(st.sampled_from([" ", "  ", " \t", "\n "])), out)
    article = draw(st.sampled_from(["", "the ", "A ", "an ", "The. "]))
    lead = draw(st.sampled_from(["", " ", " \t"]))
    tail = draw(st.sampled_from(["", "the", "a"]))
    return f"{lead}{article}{out} {tail}"


@settings(max_examples=60, deadline=None, database=None)
@given(data=st.data(), text=words)
def test_exact_match_ignores_case_punctuation_articles(data, text):
    variant = data.draw(noisy(text))
    assert normalize_answer(variant) == normalize_answer(text)
    assert exact_match(variant, text) and exact_match(text, variant)
    assert token_f1(variant, text) == 1.0
    other = data.draw(noisy(text))
    assert exact_match(variant, other)
