"""Step-GRPO's dynamic truncated rollout (training rollouts only), batched over one vLLM engine.

Each sample moves through think -> probe -> answer (../shared/specs/ALGORITHMS.md §4):

- think: sample until a trigger word ("Wait") or `think_end`, within the thinking budget
  (`think_budget` x max_new_tokens). `think_end` -> answer (natural). The budget hit, or
  `repeat_chunks` identical chunks in a row (the text between triggers) -> answer.
- probe: the trigger and what follows are dropped; `probe_text` is appended after the thinking
  so far and at most `probe_tokens` tokens are decoded greedily. Confidence is the geometric mean
  of their probabilities (greedy: the top-1), skipping the first token; in strict mode it is 0
  unless the probe closed with `think_end`. Above `threshold`, or with the thinking within
  `near_budget_tokens` of its budget, the sample exits to answer; otherwise the probe is
  discarded, the trigger is appended again and thinking goes on. After `max_probes` failed probes
  thinking runs to its natural end.
- answer: `answer_text` ("\\n</think>\\n\\n") is appended unless the model closed its thinking
  itself, and the answer is sampled with what is left of max_new_tokens.

All samples run in the engine's batch together (think, probe and answer requests side by side),
never one at a time, and continuously: a sample's next request joins the batch as soon as its
last one finishes rather than after the slowest sample's. Each request has its own seed (derived
from the prompt's seed, the sample and the call), so rollouts do not depend on the batching. A
sample's successive requests share their prompt prefix, which the engine's prefix cache serves.

The result is the trajectory the learner scores: sampled tokens with their log-probs, and the
inserted text (re-appended triggers, `answer_text`) as tokens flagged `inserted`, which have no
engine log-prob. The text a reward sees is the decoded token ids.

A stop string fires on text, so a trigger inside a longer word ("Waiting") also stops a chunk:
one preceded by a letter ("Await") is taken back and sampling goes on; one followed by letters
cannot be told apart before the next token is sampled, and costs one probe.
"""
from __future__ import annotations

import itertools
import math
import uuid
from dataclasses import dataclass, field

EXIT_REASONS = ("early_exit", "natural", "budget", "repetition")


@dataclass(frozen=True)
class Truncation:
    """The state machine's settings; the recipe's `rollout.truncation` holds their defaults."""
    triggers: tuple[str, ...]
    think_end: str
    think_budget: float       # fraction of max_new_tokens available to thinking
    probe_text: str
    probe_tokens: int
    threshold: float          # δ
    strict: bool
    near_budget_tokens: int
    max_probes: int
    repeat_chunks: int
    answer_text: str


@dataclass
class _Sample:
    prompt: list[int]
    seed: int | None
    phase: str = "think"                       # think | probe | answer | done
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    inserted: list[bool] = field(default_factory=list)
    chunks: list[str] = field(default_factory=list)  # thinking text between triggers, in order
    chunk_start: int = 0                       # token index where the current chunk began
    pending_trigger: list[int] = field(default_factory=list)  # re-appended if the probe fails
    probes: int = 0
    confidences: list[float] = field(default_factory=list)
    calls: int = 0
    exit: str = "natural"
    finish_reason: str = "stop"

    def append(self, ids: list[int], logprobs: list[float] | None) -> None:
        self.tokens += ids
        self.logprobs += logprobs if logprobs is not None else [None] * len(ids)
        self.inserted += [logprobs is None] * len(ids)


def truncated_rollout(llm, prompts: list[list[int]], seeds: list[int | None], n: int, temperature: float,
                      top_p: float, max_new_tokens: int, cfg: Truncation) -> list[list[dict]]:
    """For each prompt, n truncated rollouts as completion dicts: token_ids, logprobs (None on
    inserted tokens), inserted, finish_reason, text, exit, probes, confidences."""
    from vllm import SamplingParams, TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    tok = llm.get_tokenizer()
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    probe_ids, answer_ids = encode(cfg.probe_text), encode(cfg.answer_text)
    budget = min(int(cfg.think_budget * max_new_tokens), max_new_tokens - len(answer_ids) - 1)
    max_model_len = llm.llm_engine.model_config.max_model_len
    samples = [_Sample(p, None if s is None else _derive(s, j)) for p, s in zip(prompts, seeds) for j in range(n)]

    def request(s: _Sample):
        s.calls += 1
        seed = None if s.seed is None else _derive(s.seed, s.calls)
        if s.phase == "probe":
            return (s.prompt + s.tokens + probe_ids,
                    SamplingParams(temperature=0.0, stop=[cfg.think_end],
                                   max_tokens=min(cfg.probe_tokens, max_model_len - len(s.prompt + s.tokens + probe_ids)),
                                   include_stop_str_in_output=True, logprobs=0))
        if s.phase == "think":
            stop = [cfg.think_end] + (list(cfg.triggers) if s.probes < cfg.max_probes else [])
            return (s.prompt + s.tokens,
                    SamplingParams(temperature=temperature, top_p=top_p, max_tokens=budget - len(s.tokens), stop=stop,
                                   include_stop_str_in_output=True, logprobs=0, seed=seed))
        return (s.prompt + s.tokens,
                SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens - len(s.tokens),
                               logprobs=0, seed=seed))

    def to_answer(s: _Sample, reason: str, insert: bool = True) -> None:
        s.exit, s.phase = reason, "answer"
        if insert:
            s.append(answer_ids, None)

    def advance(s: _Sample, c) -> None:
        """Move `s` on by the output `c` of its last request."""
        ids, logprobs = list(c.token_ids), sampled_logprobs(c)
        if s.phase == "answer":
            s.append(ids, logprobs)
            s.phase, s.finish_reason = "done", c.finish_reason
        elif s.phase == "probe":
            s.probes += 1
            closed = cfg.think_end in c.text
            confidence = _confidence(logprobs) if closed or not cfg.strict else 0.0
            s.confidences.append(confidence)
            if confidence > cfg.threshold:
                to_answer(s, "early_exit")
            elif budget - len(s.tokens) <= cfg.near_budget_tokens or len(s.tokens) + len(s.pending_trigger) >= budget:
                to_answer(s, "budget")
            else:
                s.append(s.pending_trigger, None)
                s.phase = "think"
        elif c.finish_reason == "length":
            s.append(ids, logprobs)
            to_answer(s, "budget")
        elif c.stop_reason == cfg.think_end:
            s.append(ids, logprobs)
            to_answer(s, "natural", insert=False)
        elif isinstance(c.stop_reason, str):  # a trigger
            _at_trigger(s, tok, ids, logprobs, c.text, c.stop_reason, cfg)
            if s.phase == "probe" and len(s.chunks) >= cfg.repeat_chunks \
                    and len(set(s.chunks[-cfg.repeat_chunks:])) == 1:
                to_answer(s, "repetition")
        else:  # end of sequence without closing the thinking
            s.append(ids, logprobs)
            s.phase = "done"

    # Continuous batching: a sample's next request joins the running batch as soon as its last
    # one finishes, instead of waiting for the slowest sample of a round.
    waiting: dict[str, _Sample] = {}
    request_ids = (f"prunerl-truncated-{uuid.uuid4().hex}-{k}" for k in itertools.count())

    def submit(s: _Sample) -> None:
        ids, params = request(s)
        params.output_kind = RequestOutputKind.FINAL_ONLY
        request_id = next(request_ids)
        llm.llm_engine.add_request(request_id, TokensPrompt(prompt_token_ids=ids), params)
        waiting[request_id] = s

    for s in samples:
        submit(s)
    while waiting:
        for out in llm.llm_engine.step():
            if out.finished:
                s = waiting.pop(out.request_id)
                advance(s, out.outputs[0])
                if s.phase != "done":
                    submit(s)
    return [[_completion(s, tok) for s in samples[i * n:(i + 1) * n]] for i in range(len(prompts))]


def _at_trigger(s: _Sample, tok, ids: list[int], logprobs: list[float], text: str, trigger: str,
                cfg: Truncation) -> None:
    """A think chunk stopped on `trigger`: keep the tokens before it and go to probe, or (a
    trigger inside a word) keep everything and think on."""
    start = len(text) - len(trigger)
    if (text[start - 1].isalpha() if start > 0 else bool(s.tokens) and _ends_alpha(tok, s.tokens)):
        s.append(ids, logprobs)
        return
    keep = len(ids)
    while keep > 0 and len(tok.decode(ids[:keep])) > start:
        keep -= 1
    kept_text = tok.decode(ids[:keep])
    s.append(ids[:keep], logprobs[:keep])
    s.chunks.append(tok.decode(s.tokens[s.chunk_start:]))
    s.chunk_start = len(s.tokens)
    s.pending_trigger = tok(text[len(kept_text):], add_special_tokens=False)["input_ids"]
    s.phase = "probe"


def _ends_alpha(tok, tokens: list[int]) -> bool:
    tail = tok.decode(tokens[-1:])
    return bool(tail) and tail[-1].isalpha()


def _confidence(logprobs: list[float]) -> float:
    """Geometric mean of the probe tokens' probabilities, the first token skipped."""
    rest = logprobs[1:]
    return math.exp(sum(rest) / len(rest)) if rest else 0.0


def sampled_logprobs(c) -> list[float]:
    """The engine's log-prob of each sampled token of a vLLM completion (requested with logprobs=0)."""
    return [step[token].logprob for token, step in zip(c.token_ids, c.logprobs)]


def _derive(seed: int, index: int) -> int:
    """A seed for the index-th sample or call of a seeded request (independent streams)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _completion(s: _Sample, tok) -> dict:
    return {"token_ids": s.tokens, "logprobs": s.logprobs, "inserted": s.inserted,
            "finish_reason": s.finish_reason, "text": tok.decode(s.tokens, skip_special_tokens=True),
            "exit": s.exit, "probes": s.probes, "confidences": s.confidences}
