"""GSM8K answers: the reference from the dataset's answer column, the prediction from a completion.

Every scan here is linear in the length of the text (no nested regex quantifiers, braces
matched in one pass), so a long or adversarial completion cannot make extraction itself slow.
"""
from __future__ import annotations

import re

# A decimal number, optionally negative, with optional thousands separators ("1,234.5").
# The minus sign counts only when it does not follow a word character or digit ("10-5" -> 5).
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# \boxed{ opens a box; escaped braces \{ \} are latex set braces, not grouping.
_BRACE_TOKEN = re.compile(r"\\boxed\{|\\[{}]|[{}]")


def reference_answer(answer_field: str) -> str:
    """GSM8K's answer column "...reasoning...\\n#### 1,234" -> "1234"; without "####", stripped."""
    if "####" not in answer_field:
        return answer_field.strip()
    return _normalize(answer_field.rsplit("####", 1)[1])


def extract_answer(completion: str) -> str | None:
    """The model's final answer, or None.

    Inside the last <answer>...</answer> first, then the whole completion; in each, in order:
    the number after the last "####", the content of the last balanced \\boxed{...}, the last
    number. "####" comes first because math-verify alone would take the last number in the text.
    """
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
    boxed = _normalize(_last_boxed(text) or "")
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


def _normalize(answer: str) -> str:
    answer = answer.strip().rstrip(".").strip()
    return _THOUSANDS_COMMA.sub("", answer)
