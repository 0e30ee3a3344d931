import itertools
import re
import sys
import time
from pathlib import Path

import pytest

from math_verify.errors import TimeoutException

from rewards import VERIFIERS, RewardPool, max_chars_for, register
from rewards.boxed import last_boxed
from rewards.gsm8k import extract_answer, reference_answer
from rewards.verifiers import THINK_ANSWER_PATTERN, boxed_accuracy, boxed_format, format_reward, gsm8k_accuracy

# The pool's workers import test verifiers by module name; they inherit this sys.path.
sys.path.insert(0, str(Path(__file__).parent))
import _test_verifiers  # noqa: E402

register("sleepy", _test_verifiers.sleepy)
register("faulty", _test_verifiers.faulty)

GOOD = "<think>3 + 4 = 7</think>\n<answer>7</answer>"


# --- GSM8K answers ------------------------------------------------------------------------

@pytest.mark.parametrize("field, expected", [
    ("Natalia sold 48/2 = 24 clips in May.\nTotal 48+24 = 72\n#### 72", "72"),
    ("so 1000 + 234 = 1234\n#### 1,234", "1234"),
    ("#### -3", "-3"),
    ("  42 \n", "42"),
])
def test_reference_answer(field, expected):
    assert reference_answer(field) == expected


@pytest.mark.parametrize("completion, expected", [
    # "####" wins over a later number (math-verify alone would take the 5)
    ("#### 72\nBut wait, 5", "72"),
    ("First 3, then 4.\n#### 1,234.", "1234"),
    # \boxed, nested braces, the last box
    ("so it is \\boxed{\\frac{1}{2}} in the end", "\\frac{1}{2}"),
    ("\\boxed{1} no, \\boxed{\\frac{3}{4}} then 9", "\\frac{3}{4}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\boxed{72.}", "72"),
    # an unclosed box is ignored: the last number decides
    ("\\boxed{\\frac{1}{2}", "2"),
    # <answer> first, then the whole completion
    ("<think>5 and 7</think>\n<answer>The total is 12.</answer> Wait, 13", "12"),
    ("<think>I get 9</think>\n<answer>nine</answer>", "9"),
    ("<answer>#### 8</answer>\n#### 6", "8"),
    # the last number, commas, negatives
    ("He has 3 apples and 4 pears, so 7.", "7"),
    ("The farm earns 1,234,567 dollars a year", "1234567"),
    ("the change is -15 degrees", "-15"),
    ("it drops to -3.5", "-3.5"),
    ("10-5", "5"),
    ("(1, 2)", "2"),
    # exponents belong to the number; unicode minus signs are minus signs
    ("#### 1e309", "1e309"),
    ("it is 7.2E+1 or so", "7.2E+1"),
    ("3 eggs", "3"),
    ("the change is \u221215 degrees", "-15"),
    ("#### \uff0d3", "-3"),
    ("pages 3\u20135", "5"),
    # \text{} wrappers and units in a box
    ("\\boxed{\\text{72 apples}}", "72"),
    ("\\boxed{72 \\text{apples}}", "72"),
    ("\\boxed{\\$72 per week.}", "72"),
    ("\\boxed{\\text{seventy-two}}", "seventy-two"),
    ("\\boxed{2x}", "2x"),            # no space: an expression, not a unit
    ("\\boxed{3 + 4 apples}", "3 + 4 apples"),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize("completion", ["", "no digits here", "\\boxed{}", "<answer></answer>", "####"])
def test_extract_answer_none(completion):
    assert extract_answer(completion) is None


# --- verifiers, called directly ---------------------------------------------------------

@pytest.mark.parametrize("completion, reference", [
    ("#### 72", "72"),
    ("\\boxed{72}", "72"),
    ("The answer is 72.0", "72"),
    ("The answer is $72$", "72"),
    ("It costs 1,234", "1234"),
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{\\dfrac12}", "0.5"),
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{\\$72}", "72"),
    ("#### 72\nBut wait, 5", "72"),
    (GOOD, "reasoning\n#### 7"),  # a raw GSM8K answer field works as the reference too
    ("10-5", "5"),
    ("\u221272", "-72"),
    ("\\boxed{\ufe6372}", "-72"),
    ("\u221272", "reasoning\n#### \u221272"),
    ("#### 7.2e1", "72"),
    ("The answer is 7.2E+1", "72"),
    ("\\boxed{1.5e-3}", "0.0015"),
    ("\\boxed{\\text{72 apples}}", "72"),
    ("\\boxed{72\\text{ dollars}}", "72"),
])
def test_accuracy_equal(completion, reference):
    assert gsm8k_accuracy(completion, reference) == 1.0


@pytest.mark.parametrize("completion, reference", [
    ("The answer is 71", "72"),
    ("#### 5\nno wait, 72", "72"),
    ("-72", "72"),
    ("7.2", "72"),
    ("no number", "72"),
    ("", "72"),
    ("#### 1e309", "1"),      # not 1 with its exponent dropped (nor an overflowing float)
    ("#### 2e1", "2"),
    ("\u221272", "72"),       # unicode minus: -72
    ("#### 1e-7", "0"),
    ("\\boxed{7.2e1}", "7.2"),
])
def test_accuracy_not_equal(completion, reference):
    assert gsm8k_accuracy(completion, reference) == 0.0


@pytest.mark.parametrize("completion, expected", [
    (GOOD, 1.0),
    ("<think>line 1\nline 2</think>\n<answer>7</answer>", 1.0),
    ("<think>a</think><answer>7</answer>", 0.0),          # the newline is required
    ("<think>a</think>\n<answer>7</answer> more", 0.0),   # must match the whole completion
    ("<think>a</think>\n<answer>7</answer>\n", 0.0),
    ("Sure! <think>a</think>\n<answer>7</answer>", 0.0),
    ("<answer>7</answer>", 0.0),
])
def test_format_default_pattern(completion, expected):
    assert format_reward(completion, "7") == expected


def test_accuracy_long_answer_is_not_sent_to_math_verify():
    # math-verify would time out (and raise) on this; only a string-equal long answer scores.
    long_sum = "1+" * 5000 + "1"
    start = time.monotonic()
    assert gsm8k_accuracy(f"\\boxed{{{long_sum}}}", "5001") == 0.0
    assert gsm8k_accuracy(f"\\boxed{{{long_sum}}}", long_sum) == 1.0
    assert time.monotonic() - start < 5


def test_format_default_pattern_matches_the_regex():
    """The default pattern's one-pass check agrees with the regex on every string of up to 6 pieces."""
    pieces = ["<think>", "</think>", "\n", "<answer>", "</answer>", "</think>\n<answer>", "x"]
    matches = 0
    for n in range(7):
        for parts in itertools.product(pieces, repeat=n):
            text = "".join(parts)
            expected = 1.0 if re.fullmatch(THINK_ANSWER_PATTERN, text, re.DOTALL) else 0.0
            assert format_reward(text, "") == expected, text
            matches += expected == 1.0
    assert matches > 100


def test_format_default_pattern_is_linear():
    # The regex backtracks over every "</think>\n<answer>": Python's re takes 10+ s on this.
    repetitive = "<think>" + "</think>\n<answer>x</answer>\n" * 6500 + "#### 7"
    start = time.monotonic()
    assert format_reward(repetitive, "7") == 0.0
    assert format_reward(repetitive + "</answer>", "7") == 1.0
    assert time.monotonic() - start < 1


def test_format_catastrophic_pattern_is_cut_short():
    start = time.monotonic()
    assert format_reward("a" * 30 + "b", "", pattern=r"^(a+)+$") == 0.0  # Python's re: ~30 s
    with pytest.raises(TimeoutError):
        format_reward("a" * 40 + "b", "", pattern=r"^(a|a)*$")           # regex backtracks too
    assert time.monotonic() - start < 10


def test_format_custom_pattern():
    assert format_reward("123", "", pattern=r"\d+") == 1.0
    assert format_reward("123a", "", pattern=r"\d+") == 0.0


# --- MATH-style answers: the last \boxed{}, compared by math-verify ------------------------

@pytest.mark.parametrize("text, expected", [
    ("so it is \\boxed{\\frac{1}{2}} in the end", "\\frac{1}{2}"),
    ("\\boxed{1} no, \\boxed{\\frac{3}{4}} then 9", "\\frac{3}{4}"),   # the last box, not the last number
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),                             # escaped braces do not group
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\boxed{ 7 }", "7"),
    ("\\boxed {7}", "7"),
    ("\\boxed{\\boxed{3}}", "3"),
    ("The answer is $\\boxed 5$.", "5"),                                # latex's undelimited argument
    ("it is \\boxed 5.", "5"),
    ("\\boxed{1} then \\boxed{2", None),                              # the last box is cut off
    ("\\boxed{" * 2000 + "\\frac{1}{", None),
    ("\\boxed{}", None),
    ("\\boxed{  }", None),
    ("The answer is 5.", None),
    ("\\fbox{5} \\boxedx{5}", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


# (completion, reference, expected score): forms of MATH answers, right and wrong.
BOXED_CASES = [
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac12}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\tfrac{3}{4}}", "\\dfrac{3}{4}", 1.0),
    ("\\boxed{\\frac{1}{3}}", "0.333", 0.0),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", 1.0),
    ("\\boxed{\\sqrt{18}}", "3\\sqrt{2}", 1.0),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{3}", 0.0),
    ("\\boxed{\\pi/3}", "\\frac{\\pi}{3}", 1.0),
    ("\\boxed{2 \\pi}", "2\\pi", 1.0),
    ("\\boxed{3.14}", "\\pi", 0.0),
    ("\\boxed{(0,1]}", "(0, 1]", 1.0),
    ("\\boxed{[0,1]}", "(0, 1]", 0.0),
    ("\\boxed{(-\\infty, 2)}", "(-\\infty,2)", 1.0),
    ("\\boxed{(3, -1)}", "(3,-1)", 1.0),
    ("\\boxed{(-1, 3)}", "(3,-1)", 0.0),                      # order matters in a coordinate
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "(3,\\pi/2)", 1.0),
    ("\\boxed{x = 3}", "3", 1.0),
    ("\\boxed{3}", "x=3", 1.0),
    ("\\boxed{y = 2x - 1}", "y=2x+1", 0.0),
    ("\\boxed{30^\\circ}", "30", 1.0),
    ("\\boxed{30}", "30^{\\circ}", 1.0),
    ("\\boxed{\\text{(C)}}", "C", 1.0),
    ("\\boxed{C}", "\\text{(C)}", 1.0),
    ("\\boxed{\\text{(B)}}", "\\text{(C)}", 0.0),
    ("\\boxed{\\text{even}}", "\\text{odd}", 0.0),
    ("\\boxed{-5}", "-5", 1.0),
    ("\\boxed{5}", "-5", 0.0),
    ("\\boxed{\u22125}", "-5", 1.0),                           # unicode minus
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{1000000}", "1,000,000", 1.0),
    ("\\boxed{100}", "1,000", 0.0),
    ("\\boxed{\\{1,2,3\\}}", "\\{3,2,1\\}", 1.0),
    ("\\boxed{3, 5}", "3", 0.0),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    ("\\boxed{x^3}", "x^2", 0.0),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", 1.0),
    ("\\boxed{10\\%}", "0.1", 1.0),
    ("\\boxed{\\$18.90}", "18.9", 1.0),
    ("\\boxed{12\\text{ inches}}", "12", 1.0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}} and finally \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),  # the last box wins
    ("\\boxed{\\frac{1}{2}} and finally \\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{1}{2}", 0.0),
    ("The answer is $\\boxed 5$.", "5", 1.0),
    ("The answer is 5.", "5", 0.0),                            # no box: no answer, whatever the text says
    ("\\boxed{\\frac{1}{2}", "\\frac{1}{2}", 0.0),             # cut off
    ("<think>1/2 of it</think>\n<answer>\\boxed{\\frac12}</answer>", "0.5", 1.0),
]


@pytest.mark.parametrize("completion, reference, expected", BOXED_CASES)
def test_boxed_accuracy(completion, reference, expected):
    assert boxed_accuracy(completion, reference) == expected


def test_boxed_accuracy_grades_exact_above_equivalent():
    assert boxed_accuracy("\\boxed{\\frac{1}{2}}", " \\frac{1}{2} ", exact_score=2.0, equivalent_score=1.5) == 2.0
    assert boxed_accuracy("\\boxed{0.5}", "\\frac{1}{2}", exact_score=2.0, equivalent_score=1.5) == 1.5
    assert boxed_accuracy("\\boxed{0.6}", "\\frac{1}{2}", exact_score=2.0, equivalent_score=1.5) == 0.0


@pytest.mark.parametrize("completion, reference", [
    ("", "1"), ("\\boxed{", "1"), ("\\boxed{1}", ""), ("\\boxed{1}", "   "), ("}}}{{{\\boxed}", "1"),
    ("\\boxed{\\frac{}{}}", "1"), ("\\boxed{)(}", "1"), ("\\boxed{\\begin{pmatrix}}", "1"), ("\\boxed{\\\\}", "1"),
    ("\\boxed{\\frac{1}{0}}", "\\infty"), ("\\boxed{1}", "\\frac{"), ("\\boxed{2}", "}"), ("\\boxed{\x00}", "1"),
])
def test_boxed_accuracy_malformed_scores_0(completion, reference):
    assert boxed_accuracy(completion, reference) == 0.0


def test_boxed_accuracy_is_bounded():
    """A comparison past math-verify's limit raises its TimeoutException (the pool counts it); an
    answer too long to verify only scores when exact."""
    start = time.monotonic()
    with pytest.raises(TimeoutException):
        boxed_accuracy("\\boxed{10^{10^{10}}}", "7")
    long_sum = "1+" * 5000 + "1"
    assert boxed_accuracy(f"\\boxed{{{long_sum}}}", "5001") == 0.0
    assert boxed_accuracy(f"\\boxed{{{long_sum}}}", long_sum) == 1.0
    assert boxed_accuracy("\\boxed{" * 100_000 + "1", "1") == 0.0
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("completion, expected", [
    ("so \\boxed{7}", 1.0),
    ("\\boxed{\\frac{1}{2}} hmm", 1.0),
    ("$\\boxed 7$", 1.0),
    ("the answer is 7", 0.0),
    ("\\boxed{}", 0.0),
    ("\\boxed{7", 0.0),
    ("\\boxed{7} or rather \\boxed{\\frac{1}{", 0.0),     # the last box must be complete
])
def test_boxed_format(completion, expected):
    assert boxed_format(completion, "") == expected


def test_registry():
    assert {"gsm8k_accuracy", "format", "boxed_accuracy", "boxed_format", "sleepy"} <= set(VERIFIERS)

    @register("constant_for_test")
    def constant(completion, reference):
        return 0.25
    assert VERIFIERS["constant_for_test"] is constant
    del VERIFIERS["constant_for_test"]


# --- the pool ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pool():
    terms = [{"verifier": "gsm8k_accuracy", "weight": 2.0},
             {"verifier": "format", "weight": 0.5, "pattern": None}]
    with RewardPool(terms, workers=2, timeout_s=5.0, chunk_size=2, accuracy="gsm8k_accuracy") as p:
        yield p


def test_pool_weighted_total(pool):
    completions = [GOOD,                                            # right, formatted
                   "<think>3 + 4</think>\n<answer>8</answer>",      # wrong, formatted
                   "3 + 4 = \\boxed{7}",                            # right, unformatted
                   "no idea"]                                       # neither
    result = pool.score(completions, ["7"] * 4)
    assert result.per_verifier == {"gsm8k_accuracy": [1.0, 0.0, 1.0, 0.0], "format": [1.0, 1.0, 0.0, 0.0]}
    assert result.total == [2.5, 0.5, 2.0, 0.0]
    assert result.correct == [True, False, True, False]
    assert (result.timeouts, result.errors, result.rejected) == (0, 0, 0)


def test_graded_accuracy_scores_exact_above_equivalent():
    """The CPPO paper's GSM8K reward: 2 for the reference string, 1.5 for a math-equal answer."""
    terms = [{"verifier": "gsm8k_accuracy", "weight": 1.0, "exact_score": 2.0, "equivalent_score": 1.5}]
    with RewardPool(terms, workers=1, accuracy="gsm8k_accuracy") as graded:
        result = graded.score(["#### 72", "#### 72.0", "#### 71", "#### 1,234"], ["72", "72", "72", "1234"])
    assert result.total == [2.0, 1.5, 0.0, 2.0]
    assert result.correct == [True, True, False, True]


def test_pool_with_boxed_accuracy_defines_correct():
    """A MATH recipe's terms (Step-GRPO: accuracy plus format): `correct` follows boxed_accuracy, and
    malformed completions are scored 0 or counted, never fatal."""
    terms = [{"verifier": "boxed_format", "weight": 0.5}, {"verifier": "boxed_accuracy", "weight": 1.0}]
    completions = ["so \\boxed{\\dfrac12}",                  # right
                   "\\boxed{x = 3}",                          # right: 3
                   "\\boxed{(0, 1)}",                         # wrong interval, formatted
                   "the answer is 0.5",                       # no box
                   "\\boxed{\\frac{1}{2}",                     # cut off
                   "\\boxed{" * 2000 + "\\frac{1}{",             # unbalanced
                   "\\boxed{10^{10^{10}}}",                    # math-verify times out
                   "",                                        # rejected
                   "\\boxed{30^\\circ}"]                       # right: 30
    references = ["0.5", "3", "(0, 1]", "0.5", "\\frac{1}{2}", "1", "7", "1", "30"]
    with RewardPool(terms, workers=1, timeout_s=10.0, chunk_size=4, accuracy="boxed_accuracy") as boxed:
        start = time.monotonic()
        result = boxed.score(completions, references)
        assert time.monotonic() - start < 20
    assert result.per_verifier["boxed_accuracy"] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert result.per_verifier["boxed_format"] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert result.total == [1.5, 1.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 1.5]
    assert result.correct == [True, True, False, False, False, False, False, False, True]
    assert (result.timeouts, result.errors, result.rejected) == (1, 0, 1)


def test_pool_accuracy_names_the_term_that_defines_correct():
    """With both accuracy verifiers as terms, `correct` follows the one named, not gsm8k_accuracy."""
    terms = [{"verifier": "gsm8k_accuracy", "weight": 1.0}, {"verifier": "boxed_accuracy", "weight": 1.0}]
    completions, references = ["#### 7", "\\boxed{7}"], ["7", "7"]
    for accuracy, correct in [("boxed_accuracy", [False, True]), ("gsm8k_accuracy", [True, True]),
                              (None, [False, False])]:
        with RewardPool(terms, workers=1, accuracy=accuracy) as p:
            assert p.score(completions, references).correct == correct, accuracy


def test_pool_keeps_order_across_chunks(pool):
    answers = [str(k) for k in range(11)]
    result = pool.score([f"#### {a}" for a in answers], answers[:5] + ["x"] + answers[6:])
    assert result.correct == [k != 5 for k in range(11)]


def test_pool_empty_batch(pool):
    result = pool.score([], [])
    assert (result.total, result.correct, result.per_verifier["format"]) == ([], [], [])


def test_pool_length_mismatch(pool):
    with pytest.raises(ValueError):
        pool.score(["#### 1"], [])


def test_pool_malformed_inputs(pool):
    completions = [
        "",                                  # rejected
        "   \n",                             # rejected (blank)
        "1" * 1_000_000,                     # rejected (over max_chars)
        "\ud800 #### 7",                     # rejected (lone surrogate)
        "#### 7\x00",                        # rejected (NUL)
        None,                                # rejected (not a str)
        b"#### 7",                           # rejected (not a str)
        "\\boxed{" * 2000 + "\\frac{1}{",    # unbalanced: scored, the last number is 1
        "\\boxed{10^{10^{10}}}",             # math-verify's comparison times out
        GOOD,
    ]
    start = time.monotonic()
    result = pool.score(completions, ["7"] * len(completions))
    assert time.monotonic() - start < 15
    assert result.total == [0.0] * 9 + [2.5]
    assert result.correct == [False] * 9 + [True]
    assert (result.rejected, result.timeouts, result.errors) == (7, 1, 0)


@pytest.mark.parametrize("tokens, chars", [(1, 20_000), (625, 20_000), (626, 20_032),
                                           (4096, 131_072), (6000, 192_000)])
def test_max_chars_for(tokens, chars):
    assert max_chars_for(tokens) == chars


@pytest.mark.parametrize("tokens", [0, -5])
def test_max_chars_for_rejects_no_tokens(tokens):
    with pytest.raises(ValueError):
        max_chars_for(tokens)


def test_pool_scores_a_long_completion_within_max_chars_for(pool):
    step = "Natalia sold 48/2 = 24 clips in May, so 48 + 24 = 72 altogether. Let me check again.\n"
    long_right = "<think>" + step * 720 + "</think>\n<answer>\\boxed{72}</answer>"
    assert 60_000 < len(long_right) < max_chars_for(4096)
    assert pool.score([long_right], ["72"]).rejected == 1  # the fixed 20,000 default refuses it
    terms = [{"verifier": "gsm8k_accuracy", "weight": 1.0}, {"verifier": "format", "weight": 0.5}]
    with RewardPool(terms, workers=1, max_chars=max_chars_for(4096), accuracy="gsm8k_accuracy") as long_pool:
        start = time.monotonic()
        result = long_pool.score([long_right] * 4 + [long_right.replace("{72}", "{71}")], ["72"] * 5)
        assert time.monotonic() - start < 10
    assert result.total == [1.5] * 4 + [0.5]
    assert (result.rejected, result.timeouts, result.errors) == (0, 0, 0)


def test_pool_counts_a_format_regex_timeout():
    terms = [{"verifier": "format", "weight": 1.0, "pattern": r"^(a|a)*$"}]
    # timeout_s far above the format limit: the regex's own timeout must end it, not the pool.
    with RewardPool(terms, workers=1, timeout_s=60.0, accuracy=None) as slow:
        start = time.monotonic()
        result = slow.score(["a" * 40 + "b", "aaaa"], ["", ""])
        assert time.monotonic() - start < 10
        assert result.total == [0.0, 1.0]
        assert (result.timeouts, result.errors, result.rejected) == (1, 0, 0)
        assert slow.score(["aa"], [""]).total == [1.0]


def test_pool_max_chars_is_a_limit_not_a_truncation():
    long_but_right = "x" * 30 + " #### 7"
    with RewardPool([{"verifier": "gsm8k_accuracy", "weight": 1.0}], workers=1, max_chars=30,
                    accuracy="gsm8k_accuracy") as small:
        result = small.score([long_but_right, "#### 7"], ["7", "7"])
    assert result.total == [0.0, 1.0]
    assert result.rejected == 1


def test_pool_timeout_kills_a_hung_task():
    with RewardPool([{"verifier": "sleepy", "weight": 1.0}], workers=2, timeout_s=0.5, chunk_size=4,
                    accuracy=None) as slow:
        start = time.monotonic()
        result = slow.score(["a", "sleep", "b", "c", "d"], ["0"] * 5)
        assert time.monotonic() - start < 20  # the verifier sleeps 60 s
        # Only the hung completion loses its score, not the rest of its chunk.
        assert result.total == [1.0, 0.0, 1.0, 1.0, 1.0]
        assert (result.timeouts, result.errors) == (1, 0)
        # The pool replaced the killed worker and goes on.
        assert slow.score(["e"], ["0"]).total == [1.0]


def test_pool_counts_errors_and_dead_workers():
    terms = [{"verifier": "faulty", "weight": 3.0}]
    with RewardPool(terms, workers=1, timeout_s=5.0, chunk_size=8, accuracy=None) as pool_:
        result = pool_.score(["ok", "raise", "nan", "die", "ok"], ["0"] * 5)
    assert result.total == [3.0, 0.0, 0.0, 0.0, 3.0]
    assert result.correct == [False] * 5  # no accuracy verifier
    assert (result.errors, result.timeouts) == (3, 0)


@pytest.mark.parametrize("terms", [
    [],
    [{"verifier": "nope", "weight": 1.0}],
    [{"verifier": "gsm8k_accuracy", "weight": 1.0, "pattern": "x"}],  # takes no options
    [{"verifier": "format", "weight": 1.0}, {"verifier": "format", "weight": 2.0}],
])
def test_pool_rejects_bad_terms(terms):
    with pytest.raises(ValueError):
        RewardPool(terms, accuracy=None)


def test_pool_accuracy_must_be_a_term():
    with pytest.raises(ValueError, match="'boxed_accuracy' is not one of the terms"):
        RewardPool([{"verifier": "gsm8k_accuracy", "weight": 1.0}], accuracy="boxed_accuracy")


def test_pool_close():
    p = RewardPool([{"verifier": "format", "weight": 1.0, "pattern": r"\d+"}], workers=1, accuracy=None)
    with p:
        assert p.score(["12", "ab"], ["", ""]).total == [1.0, 0.0]
    with pytest.raises(RuntimeError):
        p.score(["12"], [""])


def test_pool_survives_a_worker_killed_while_idle(capsys):
    """pebble often marks the whole pool broken when an idle worker dies (the pool then starts a
    new one and says so); either way the next batch is scored in full."""
    import psutil

    with RewardPool([{"verifier": "gsm8k_accuracy", "weight": 1.0}], workers=2, accuracy="gsm8k_accuracy") as pool:
        assert pool.score(["#### 5"], ["5"]).correct == [True]  # workers are up
        me = psutil.Process()
        workers = [p for p in me.children(recursive=True) if p.ppid() != me.pid]  # forked by the forkserver
        assert workers
        workers[0].kill()
        workers[0].wait(10)
        for _ in range(3):  # the broken pool is noticed on the next call
            result = pool.score(["#### 5"] * 20, ["5"] * 20)
            assert result.correct == [True] * 20 and result.errors == 0
    out = capsys.readouterr().out
    assert out == "" or "the reward pool broke" in out
