"""MATH answers: the content of the last \\boxed{} in a completion or in a MATH solution.

Only the box is found here, in one linear scan with braces matched (like rewards.gsm8k), so a long or
adversarial text cannot make it slow; what the content means ("\\dfrac12", "x = 3", "(0, 1]") is left
to math-verify (rewards.verifiers.boxed_accuracy).
"""
from __future__ import annotations

import re

# "\boxed{" (or "\boxed {") opens a box; "\boxed 5" boxes the run of characters after it, as
# math-verify reads it. Escaped braces \{ \} are latex set braces, not grouping.
_TOKEN = re.compile(r"\\boxed(?:\s*(\{)|(?![A-Za-z])\s*([^\s{}$\\]+))|\\[{}]|[{}]")


def last_boxed(text: str) -> str | None:
    """The stripped content of the last box opened in `text` ("\\boxed{1} or \\boxed{\\frac{3}{4}}" ->
    "\\frac{3}{4}"); a bare "\\boxed 5." gives "5". None without a box, when the last box is empty,
    or when it never closes: a cut-off final answer does not fall back to an earlier one."""
    stack: list[int | None] = []  # content start for a box, None for a plain brace
    last = content = None  # where the last box's content starts; that content once it closes
    for token in _TOKEN.finditer(text):
        if token.group(1):
            stack.append(token.end())
            last, content = token.end(), None
        elif token.group(2):
            last, content = None, token.group(2).rstrip(".,;:")
        elif token.group() == "{":
            stack.append(None)
        elif token.group() == "}" and stack:
            start = stack.pop()
            if start is not None and start == last:
                content = text[start:token.start()]
    content = content.strip() if content is not None else ""
    return content or None
