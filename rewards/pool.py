"""Score completions with weighted verifiers in a pool of worker processes.

Scoring must never take the trainer down or stall it: a completion that makes a verifier raise,
run past `timeout_s`, or kill its worker scores 0 for every verifier and is counted. Processes
rather than threads because a hang inside sympy's C code cannot be interrupted, only killed
(pebble kills a worker whose task runs past its timeout and starts a new one), and because
math-verify's own signal-based timeouts only work in a main thread (which pebble tasks run in).

Completions go to the workers in chunks (one task each is dominated by IPC). A chunk that times
out or loses its worker is rescored one completion per task, so one bad completion costs only
itself, not its chunk.

Inputs refused before any verifier runs (score 0, counted in `rejected`): anything that is not a
str, an empty or blank completion, one over `max_chars` (scored 0, not truncated: a cut-off
answer could extract the wrong number and the format check is meaningless without the ending),
one containing NUL or lone surrogates (binary garbage, not text). `max_chars_for` derives
`max_chars` from the rollout's token limit, so that no completion the sampler may produce is
refused for its length.
"""
from __future__ import annotations

import inspect
import logging
import math
import multiprocessing
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from pebble import ProcessPool

from rewards.verifiers import VERIFIERS

_TERM_KEYS = ("verifier", "weight")
_TIMEOUT, _ERROR = "timeout", "error"
# English prose or math averages about 4 characters a token; 32 leaves 8x headroom for the many
# long tokens (runs of spaces, indentation, "-----"), so only degenerate output can exceed it.
_CHARS_PER_TOKEN = 32
# Never below the fixed limit this replaced, so a short token budget refuses nothing more than before.
_MIN_MAX_CHARS = 20_000


def max_chars_for(max_new_tokens: int) -> int:
    """A `max_chars` for completions of at most `max_new_tokens` tokens (4096 -> 131,072)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    return max(_MIN_MAX_CHARS, _CHARS_PER_TOKEN * max_new_tokens)


@dataclass
class RewardResult:
    total: list[float]                   # weighted sum per completion
    per_verifier: dict[str, list[float]]  # unweighted score per completion
    correct: list[bool]                  # the accuracy verifier's score > 0 (all False without one)
    timeouts: int = 0                    # completions scored 0 because scoring ran past a limit
    errors: int = 0                      # ... because a verifier raised (or gave NaN) or the worker died
    rejected: int = 0                    # ... because they were refused up front (see module doc)


class RewardPool:
    def __init__(self, terms: list[dict], workers: int = 2, timeout_s: float = 5.0,
                 max_chars: int = _MIN_MAX_CHARS, chunk_size: int = 16, context: str = "forkserver", *,
                 accuracy: str | None):
        """terms: [{"verifier": name, "weight": w, <option>: value, ...}]; None options are dropped.

        accuracy: the term whose score > 0 makes a completion `correct` (the recipe's
        rewards.accuracy), or None: nothing is correct.

        timeout_s bounds one task: a chunk, or one completion when a chunk is rescored.
        max_chars: longer completions are refused (see the module doc); `max_chars_for(tokens)`.
        context: "forkserver" or "spawn" (not "fork": the caller may have threads, e.g. Ray).
        """
        if not terms:
            raise ValueError("RewardPool needs at least one term")
        self._terms = []  # (name, weight, options), resolved and checked here, not in a worker
        for term in terms:
            name = term["verifier"]
            if name not in VERIFIERS:
                raise ValueError(f"unknown verifier {name!r}; known: {sorted(VERIFIERS)}")
            if any(name == seen for seen, _, _ in self._terms):
                raise ValueError(f"verifier {name!r} appears twice in the reward terms")
            options = {k: v for k, v in term.items() if k not in _TERM_KEYS and v is not None}
            try:
                inspect.signature(VERIFIERS[name]).bind("", "", **options)
            except TypeError as error:
                raise ValueError(f"verifier {name!r} does not take options {options}: {error}") from None
            self._terms.append((name, float(term.get("weight", 1.0)), options))
        if accuracy is not None and accuracy not in (name for name, _, _ in self._terms):
            raise ValueError(f"accuracy verifier {accuracy!r} is not one of the terms")
        self.accuracy = accuracy
        if context not in ("forkserver", "spawn"):
            raise ValueError(f"context must be 'forkserver' or 'spawn', not {context!r}")
        self.timeout_s = timeout_s
        self.max_chars = max_chars
        self.chunk_size = chunk_size
        self._workers, self._context, self._closed = workers, multiprocessing.get_context(context), False
        self._start_pool()

    def _start_pool(self) -> None:
        self._pool = ProcessPool(max_workers=self._workers, initializer=_init_worker, context=self._context)
        self._pool.schedule(_noop)  # starts the workers now, so the first score() is not slower

    def score(self, completions: list[str], references: list[str]) -> RewardResult:
        if self._closed:
            raise RuntimeError("the reward pool is closed")
        try:
            return self._score(completions, references)
        except RuntimeError as error:
            # pebble declares the whole pool broken when a worker dies while idle (killed, OOM):
            # start a new pool and score the batch again.
            if self._pool.active:
                raise
            print(f"[rewards] the reward pool broke ({error}); starting a new one", flush=True)
            self._pool.stop()
            self._pool.join()
            self._start_pool()
            return self._score(completions, references)

    def _score(self, completions: list[str], references: list[str]) -> RewardResult:
        if len(completions) != len(references):
            raise ValueError(f"{len(completions)} completions but {len(references)} references")
        n = len(completions)
        names = [name for name, _, _ in self._terms]
        result = RewardResult(total=[0.0] * n, per_verifier={name: [0.0] * n for name in names},
                              correct=[False] * n)

        accepted = [i for i in range(n) if self._acceptable(completions[i], references[i])]
        result.rejected = n - len(accepted)
        verifiers = [(VERIFIERS[name], options) for name, _, options in self._terms]
        outcomes: dict[int, list[float] | str] = {}  # scores, or "timeout" / "error"
        chunks = [accepted[k:k + self.chunk_size] for k in range(0, len(accepted), self.chunk_size)]
        retry: list[int] = []
        for chunk, future in [(c, self._submit(verifiers, c, completions, references)) for c in chunks]:
            try:
                outcomes.update(zip(chunk, future.result()))
            except Exception:  # ran past timeout_s or lost its worker: find the culprit one by one
                retry.extend(chunk)
        for i, future in [(i, self._submit(verifiers, [i], completions, references)) for i in retry]:
            try:
                outcomes[i] = future.result()[0]
            except FutureTimeout:
                outcomes[i] = _TIMEOUT
            except Exception:
                outcomes[i] = _ERROR

        for i, outcome in outcomes.items():
            if outcome == _TIMEOUT:
                result.timeouts += 1
            elif outcome == _ERROR:
                result.errors += 1
            else:
                for (name, weight, _), value in zip(self._terms, outcome):
                    result.per_verifier[name][i] = value
                    result.total[i] += weight * value
        if self.accuracy is not None:
            result.correct = [value > 0.0 for value in result.per_verifier[self.accuracy]]
        return result

    def _submit(self, verifiers, indices, completions, references):
        items = [(completions[i], references[i]) for i in indices]
        return self._pool.schedule(_score_items, args=(verifiers, items), timeout=self.timeout_s)

    def _acceptable(self, completion, reference) -> bool:
        if not isinstance(completion, str) or not isinstance(reference, str):
            return False
        if not completion.strip() or len(completion) > self.max_chars or "\x00" in completion:
            return False
        try:
            completion.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates
            return False
        return True

    def close(self) -> None:
        self._closed = True
        self._pool.stop()
        self._pool.join()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _score_items(verifiers, items) -> list[list[float] | str]:
    """In a worker: every verifier on every (completion, reference), or why that failed."""
    from math_verify.errors import TimeoutException  # a BaseException, not an Exception

    outcomes = []
    for completion, reference in items:
        try:
            scores = [float(fn(completion, reference, **options)) for fn, options in verifiers]
            outcomes.append(scores if all(math.isfinite(v) for v in scores) else _ERROR)
        except (TimeoutException, TimeoutError):  # math-verify's, the format regex's
            outcomes.append(_TIMEOUT)
        except Exception:
            outcomes.append(_ERROR)
    return outcomes


def _init_worker() -> None:
    # math-verify logs every timeout at WARNING with the whole input, which may be megabytes.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    from rewards.verifiers import gsm8k_accuracy

    try:
        gsm8k_accuracy("\\boxed{0.5}", "\\frac{1}{2}")  # imports and warms sympy
    except Exception:
        pass


def _noop() -> None:
    pass
