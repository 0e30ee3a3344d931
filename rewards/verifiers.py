"""Verifiers by name: fn(completion, reference, **options) -> float (0 when wrong).

`register` adds one (tests add a deliberately slow one). The reward pool sends the function
itself to its worker processes, pickled by reference, so a verifier must be a top-level function
of a module the workers can import.
"""
from __future__ import annotations

import re
import threading
from typing import Callable

import regex

from rewards.boxed import last_boxed
from rewards.gsm8k import extract_answer, reference_answer

Verifier = Callable[..., float]
VERIFIERS: dict[str, Verifier] = {}

# The CPPO paper's format reward.
THINK_ANSWER_PATTERN = r"^<think>.*?</think>\n<answer>.*?</answer>$"
# math-verify's own limits (signal.alarm: whole seconds) for one parse or comparison.
MATH_VERIFY_TIMEOUT_S = 1
# The limit for one format match. The `regex` module checks it while matching; Python's `re` cannot
# be interrupted, and a recipe's pattern that backtracks ("^(a|a)*$") could stall a worker for hours.
FORMAT_TIMEOUT_S = 1.0
# Longer extracted answers are compared as strings only: math-verify takes up to its whole timeout
# on a long one, and no GSM8K answer (nor a usual latex one) comes near this.
MAX_VERIFIED_ANSWER_CHARS = 1_000
# math-verify reads "7.2e1" as 7.2*e*1 (Euler's e); scientific notation goes to it as latex.
_SCIENTIFIC = re.compile(r"(-?(?:\d+(?:\.\d*)?|\.\d+))[eE]([+-]?\d+)")


def register(name: str, fn: Verifier | None = None):
    """Add (or replace) a verifier: `register("x", fn)` or as a decorator `@register("x")`."""
    if fn is None:
        return lambda f: register(name, f)
    VERIFIERS[name] = fn
    return fn


@register("gsm8k_accuracy")
def gsm8k_accuracy(completion: str, reference: str, exact_score: float = 1.0,
                   equivalent_score: float = 1.0) -> float:
    """`exact_score` if the extracted answer is the reference string, `equivalent_score` if
    math-verify finds them equal ("72.0" or "7.2e1" vs "72"), else 0.0. (The CPPO paper scores
    2 / 1.5.) Answers over MAX_VERIFIED_ANSWER_CHARS only score when exact.

    Raises where math-verify fails or times out (math_verify.errors.TimeoutException, a
    BaseException) instead of quietly scoring 0, so that the reward pool can count it.
    """
    predicted = extract_answer(completion)
    if predicted is None:
        return 0.0
    gold = reference_answer(reference)
    if predicted == gold:
        return exact_score
    if max(len(predicted), len(gold)) > MAX_VERIFIED_ANSWER_CHARS:
        return 0.0
    return equivalent_score if _equivalent(_latex(gold), _latex(predicted)) else 0.0


def _latex(answer: str) -> str:
    scientific = _SCIENTIFIC.fullmatch(answer)
    return f"{scientific[1]}\\times10^{{{scientific[2]}}}" if scientific else answer


@register("boxed_accuracy")
def boxed_accuracy(completion: str, reference: str, exact_score: float = 1.0,
                   equivalent_score: float = 1.0) -> float:
    """MATH-style answers: `exact_score` if the content of the completion's last \\boxed{} is the
    reference string, `equivalent_score` if math-verify finds them equal ("\\dfrac12" and "0.5",
    "x = 3" and "3", "30^\\circ" and "30", "\\text{(C)}" and "C", "(0,1]" and "(0, 1]"), else 0.0.
    No complete last box scores 0 (see rewards.boxed.last_boxed); answers over
    MAX_VERIFIED_ANSWER_CHARS only score when exact. `reference` is the answer itself, not a
    solution: data.answer_format `boxed` takes it out of a MATH solution.

    Raises where math-verify fails or times out, as gsm8k_accuracy does.
    """
    predicted = last_boxed(completion)
    gold = reference.strip()
    if predicted is None or not gold:
        return 0.0
    if predicted == gold:
        return exact_score
    if max(len(predicted), len(gold)) > MAX_VERIFIED_ANSWER_CHARS:
        return 0.0
    return equivalent_score if _equivalent(gold, predicted) else 0.0


def _equivalent(gold: str, predicted: str) -> bool:
    """math-verify's verdict on two answers written in latex or plain text."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify  # heavy (sympy)

    # signal.alarm only works in the main thread; elsewhere the caller must bound the time.
    limit = MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    # Wrapped in \boxed{} so math-verify reads bare latex ("\dfrac12") as the answer, the box first.
    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    gold_parsed, predicted_parsed = (
        parse(f"\\boxed{{{answer}}}", config, parsing_timeout=limit, raise_on_error=True)
        for answer in (gold, predicted))
    if not gold_parsed or not predicted_parsed:
        return False
    return verify(gold_parsed, predicted_parsed, timeout_seconds=limit, raise_on_error=True)


@register("format")
def format_reward(completion: str, reference: str, pattern: str = THINK_ANSWER_PATTERN) -> float:
    """1.0 if the whole completion matches `pattern` (DOTALL), else 0.0.

    Raises TimeoutError when matching runs past FORMAT_TIMEOUT_S (the reward pool counts it).
    """
    if pattern == THINK_ANSWER_PATTERN:
        return 1.0 if _think_answer(completion) else 0.0
    matched = regex.fullmatch(pattern, completion, regex.DOTALL, timeout=FORMAT_TIMEOUT_S)
    return 1.0 if matched else 0.0


def _think_answer(completion: str) -> bool:
    """THINK_ANSWER_PATTERN's verdict in one pass. The regex's time grows with the length times
    the number of "</think>\\n<answer>" in the completion (Python's re: 18 s on 192k characters
    of them), so a repetitive completion would time out and lose its accuracy score too."""
    middle = completion.find("</think>\n<answer>", len("<think>"))
    return (completion.startswith("<think>") and completion.endswith("</answer>") and middle != -1
            and middle + len("</think>\n<answer>") <= len(completion) - len("</answer>"))


@register("boxed_format")
def boxed_format(completion: str, reference: str) -> float:
    """1.0 if the completion's last \\boxed{...} is complete and not empty (an answer boxed_accuracy
    can read), else 0.0: Step-GRPO's format term."""
    return 1.0 if last_boxed(completion) is not None else 0.0
