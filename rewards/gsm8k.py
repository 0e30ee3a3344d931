"""GSM8K answers: the reference from the dataset's answer column, the prediction from a completion.

Every scan here is linear in the length of the text (no nested regex quantifiers, braces
matched in one pass), so a long or adversarial completion cannot make extraction itself slow.
"""
from __future__ import annotations

import re

# A decimal number, optionally negative, with optional thousands separators ("1,234.5") and an
# optional exponent ("7.2e1", "1E-3": part of the number, so "1e309" is not read as 1).
# The minus sign counts only when it does not follow a word character or digit ("10-5" -> 5).
_NUMBER_PATTERN = r"(?:(?<![\w.])-)?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][+-]?\d+)?"
_NUMBER = re.compile(_NUMBER_PATTERN)
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# \boxed{ opens a box; escaped braces \{ \} are latex set braces, not grouping.
_BRACE_TOKEN = re.compile(r"\\boxed\{|\\[{}]|[{}]")
# Minus signs written as U+2212 (math minus), U+2013 (en dash), U+FE63 and U+FF0D (small and
# full-width hyphen-minus) read as "-".
_MINUS_SIGNS = str.maketrans(dict.fromkeys("\u2212\u2013\ufe63\uff0d", "-"))
# Text inside a box: "\text{72 apples}" -> " 72 apples " (innermost, brace-free wrappers only).
_TEXT_MACRO = re.compile(r"\\(?:text|textrm|textbf|textit|mathrm|mbox)\s*\{([^{}]*)\}")
# A boxed number, a space, then only words (its units): "72 apples", "\$72 per week" -> the number;
# "2x" (no space) and "3 + 4 apples" stay as they are.
_NUMBER_WITH_UNITS = re.compile(rf"\s*(?:\\?\$\s*)?({_NUMBER_PATTERN})\s+[A-Za-z][A-Za-z\s.,'-]*")


def reference_answer(answer_field: str) -> str:
    """GSM8K's answer column "...reasoning...\\n#### 1,234" -> "1234"; without "####", stripped."""
    answer_field = answer_field.translate(_MINUS_SIGNS)
    if "####" not in answer_field:
        return answer_field.strip()
    return _normalize(answer_field.rsplit("####", 1)[1])


def extract_answer(completion: str) -> str | None:
    """The model's final answer, or None.

    Inside the last <answer>...</answer> first, then the whole completion; in each, in order:
    the number after the last "####", the content of the last balanced \\boxed{...} (units
    dropped: "\\text{72 apples}" -> "72"), the last number. "####" comes first because
    math-verify alone would take the last number in the text.
    """
    completion = completion.translate(_MINUS_SIGNS)
    close = completion.rfind("</answer>")
    if close != -1:
        open_ = completion.rfind("<answer>", 0, close)
        if open_ != -1:
            found = _extract(completion[open_ + len("<answer>"):close])
            if found is not None:
                return found
    return _extract(completion)


def _extract(text: str) -> str | None:
    hashes = text.rfind("####")
    if hashes != -1:
        number = _NUMBER.search(text, hashes + 4)
        if number is not None:
            return _normalize(number.group())
    boxed = _normalize(_without_units(_last_boxed(text) or ""))
    if boxed:
        return boxed
    last = None
    for last in _NUMBER.finditer(text):
        pass
    return _normalize(last.group()) if last is not None else None


def _last_boxed(text: str) -> str | None:
    """Content of the \\boxed{...} that closes last; unbalanced boxes are ignored."""
    stack: list[int | None] = []  # content start for a box, None for a plain brace
    content = None
    for token in _BRACE_TOKEN.finditer(text):
        kind = token.group()
        if kind == "\\boxed{":
            stack.append(token.end())
        elif kind == "{":
            stack.append(None)
        elif kind == "}" and stack:
            start = stack.pop()
            if start is not None:
                content = text[start:token.start()]
    return content


def _without_units(boxed: str) -> str:
    """Box content with \\text{} wrappers opened and a lone number's units dropped."""
    boxed = _TEXT_MACRO.sub(r" \1 ", boxed)
    number = _NUMBER_WITH_UNITS.fullmatch(boxed)
    return number.group(1) if number is not None else boxed


def _normalize(answer: str) -> str:
    answer = answer.strip().rstrip(".").strip()
    return _THOUSANDS_COMMA.sub("", answer)
