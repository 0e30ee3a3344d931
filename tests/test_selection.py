"""Selection: CPPO's two rules, allocation, DPPO's probabilities, unbiasedness and resumable state."""
from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from launch.schema import RLStage, SelectionConfig
from rl.aggregation import aggregate
from rl.policy_loss import token_loss
from rl.rows import TrainingRow
from rl.selection import Selector
from rl.selection.cppo import allocated_prompts, cppo_keep
from rl.selection.dppo import PromptHistory, dppo_keep_completions, prune_probabilities, sample_kept

# ---------------------------------------------------------------- CPPO


def test_cppo_batch_rule_drops_zero_advantage_groups_first():
    adv = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.5, -0.5, -0.5, -0.5])
    assert cppo_keep(adv, 4, 0.5, "batch").tolist() == [4, 5, 6, 7]


def test_cppo_batch_rule_floors_the_count_and_breaks_ties_by_position():
    adv = torch.tensor([0.1, -0.1, 0.3, -0.3])
    assert cppo_keep(adv, 2, 0.25, "batch").tolist() == [1, 2, 3]   # ⌊0.25·4⌋ = 1 dropped: the earlier 0.1
    assert cppo_keep(adv, 2, 0.5, "batch").tolist() == [2, 3]
    assert cppo_keep(adv, 2, 0.6, "batch").tolist() == [2, 3]       # ⌊2.4⌋ = 2
    # Kept per prompt varies under the batch rule: here prompt 0 keeps none.
    assert cppo_keep(torch.tensor([0.1, 0.2, 0.9, 0.8]), 2, 0.5, "batch").tolist() == [2, 3]


def test_cppo_group_rule_keeps_the_largest_per_prompt():
    adv = torch.tensor([0.1, -0.9, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    # k = ⌊4·0.5⌋ = 2 per prompt: |−0.9| and the earlier of the tied 0.5s; the all-zero group keeps its first two.
    assert cppo_keep(adv, 4, 0.5, "group").tolist() == [1, 2, 4, 5]
    assert cppo_keep(adv, 4, 0.75, "group").tolist() == [1, 4]
    with pytest.raises(ValueError, match="0 completions"):
        cppo_keep(adv, 4, 0.8, "group")


def test_allocation_arithmetic():
    assert allocated_prompts(16, 0.875) == 128
    assert allocated_prompts(16, 0.5) == 32
    assert allocated_prompts(3, 0.75) == 12
    with pytest.raises(ValueError, match="not an integer"):
        allocated_prompts(3, 0.3)


def test_schema_rejects_rates_that_break_integer_group_sizes():
    with pytest.raises(ValidationError, match=r"G\*\(1-P\) = 6\*0.25 = 1.5"):
        RLStage(name="t", algorithm="cppo", group_size=6, selection={"completions": {"rate": 0.75, "rule": "group"}})
    with pytest.raises(ValidationError, match="prompts_per_step/\\(1-P\\) = 10/0.25 = 40|10/0.3"):
        RLStage(name="t", algorithm="cppo", prompts_per_step=10,
                selection={"completions": {"rate": 0.7, "allocation": True}})
    ok = RLStage(name="t", algorithm="cppo", group_size=16, prompts_per_step=16,
                 selection={"completions": {"rate": 0.875, "rule": "group", "allocation": True}})
    assert Selector(ok.selection, 16, 0).prompts_per_step(16) == 128


def test_presets_and_explicit_axes_combine():
    cppo_dense = RLStage(name="t", algorithm="cppo", packing={"mode": "dense"})
    assert cppo_dense.selection.completions.method == "cppo" and cppo_dense.packing.mode == "dense"
    dppo_cppo_rule = RLStage(name="t", algorithm="dppo", selection={"completions": {"method": "cppo", "rate": 0.5}})
    assert dppo_cppo_rule.selection.prompts.method == "dppo"
    assert dppo_cppo_rule.selection.completions.method == "cppo" and dppo_cppo_rule.selection.completions.rate == 0.5
    assert RLStage(name="t").selection.completions.method == "all"


def test_cppo_normalises_over_kept_rows():
    rows = _rows(torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, -1.0, 0.5, -0.5]), lengths=[1, 2, 3, 4, 5, 6, 7, 8])
    selector = Selector(SelectionConfig(completions={"method": "cppo", "rate": 0.5}), 4, seed=0)
    kept, sel = selector.completions(1, rows, torch.ones(2), drawn_prompts=2)
    assert [r.advantage for r in kept] == [1.0, -1.0, 0.5, -0.5]
    assert sel.num_seqs == 4 and sel.num_tokens == 5 + 6 + 7 + 8
    assert all(r.weight == 1.0 for r in kept)

# ---------------------------------------------------------------- DPPO


def test_prune_probabilities_by_rank_hand_computed():
    # u = [1, .75, .5, .25]; mean(c·u) = .5 -> c = .8, nothing capped.
    torch.testing.assert_close(prune_probabilities(torch.tensor([0.0, 1.0, 2.0, 3.0]), 0.5, 0.9),
                               torch.tensor([0.8, 0.6, 0.4, 0.2], dtype=torch.float64))
    # rate .7: the two lowest cap at .9, then c·(.5 + .25) = 2.8 − 1.8 -> c = 4/3.
    torch.testing.assert_close(prune_probabilities(torch.tensor([3.0, 2.0, 1.0, 0.0]), 0.7, 0.9),
                               torch.tensor([1 / 3, 2 / 3, 0.9, 0.9], dtype=torch.float64))
    # Ties share their rank: equal scores, equal probabilities.
    torch.testing.assert_close(prune_probabilities(torch.tensor([5.0, 5.0, 5.0]), 0.3, 0.9),
                               torch.full((3,), 0.3, dtype=torch.float64))
    assert prune_probabilities(torch.tensor([]), 0.3, 0.9).numel() == 0


def test_sampled_weights_are_inverse_keep_probabilities():
    probs = torch.tensor([0.0, 0.5, 0.75], dtype=torch.float64)
    kept, weights = sample_kept(probs, torch.Generator().manual_seed(0))
    assert kept[0] and weights[0] == 1.0  # p = 0 always stays
    for k, w, p in zip(kept, weights, probs):
        assert w == (1 / (1 - p) if k else 0.0)


def test_deterministic_variant_prunes_the_lowest_exactly():
    adv = torch.tensor([0.1, -2.0, 0.5, 1.0])
    idx, w = dppo_keep_completions(adv, 4, 0.5, 0.9, torch.Generator(), deterministic=True)
    assert idx.tolist() == [1, 3] and w.tolist() == [2.0, 2.0]


def test_unseen_prompts_are_never_pruned_and_history_round_trips():
    selector = Selector(SelectionConfig(prompts={"method": "dppo", "rate": 0.7}), 2, seed=1)
    selector.record([10, 11, 12], torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0, 1.0]))  # stds 0, .707, 0
    for step in range(1, 50):
        positions, _ = selector.prune_prompts(step, [10, 11, 12, 99])
        assert 3 in positions  # prompt 99 has no history
    state = json.loads(json.dumps(selector.state_dict()))
    resumed = Selector(SelectionConfig(prompts={"method": "dppo", "rate": 0.7}), 2, seed=1)
    resumed.load_state_dict(state)
    for step in (3, 17):
        a, wa = selector.prune_prompts(step, [10, 11, 12, 99])
        b, wb = resumed.prune_prompts(step, [10, 11, 12, 99])
        assert a == b and torch.equal(wa, wb)
    history = PromptHistory(decay=0.5)
    history.update([7], torch.tensor([0.0, 2.0]), 2)
    history.update([7], torch.tensor([0.0, 0.0]), 2)
    assert history.scores[7] == pytest.approx(0.5 * 2 ** 0.5)


def _rows(advantages: torch.Tensor, lengths: list[int], vocab: int = 7) -> list[TrainingRow]:
    gen = torch.Generator().manual_seed(0)
    return [TrainingRow([0], torch.randint(0, vocab, (n,), generator=gen).tolist(), None, a.item())
            for a, n in zip(advantages, lengths)]


def _surrogate_grad(theta: torch.Tensor, rows: list[TrainingRow], num_seqs: float) -> torch.Tensor:
    """∇θ of the unclipped, KL-free GRPO surrogate (grpo aggregation) with a context-free policy."""
    theta = theta.clone().requires_grad_(True)
    width = max(len(r.completion_ids) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        tokens[i, :len(r.completion_ids)] = torch.tensor(r.completion_ids)
        mask[i, :len(r.completion_ids)] = 1
    logp = torch.log_softmax(theta, -1)[tokens]
    per_token, _ = token_loss(logp, logp.detach(), torch.tensor([r.advantage for r in rows]), mask,
                              eps_low=0.2, eps_high=0.2, seq_weights=torch.tensor([r.weight for r in rows]))
    aggregate(per_token, mask, "grpo", num_seqs=num_seqs, num_tokens=1, max_new_tokens=1,
              num_microbatches=1).backward()
    return theta.grad


@pytest.mark.parametrize("deterministic", [False, True])
def test_dppo_weighted_gradient_is_unbiased(deterministic):
    """Monte Carlo over DPPO's random prompt and completion pruning: the mean weighted gradient equals
    the full-batch gradient within its standard error; the deterministic variant's does not."""
    B, G = 6, 4
    gen = torch.Generator().manual_seed(3)
    advantages = torch.randn(B * G, generator=gen)
    lengths = torch.randint(1, 6, (B * G,), generator=gen).tolist()
    rows = _rows(advantages, lengths)
    theta = torch.randn(7, generator=gen)
    full = _surrogate_grad(theta, rows, num_seqs=B * G)

    cfg = SelectionConfig(prompts={"method": "dppo", "rate": 0.5, "deterministic": deterministic},
                          completions={"method": "dppo", "rate": 0.5, "deterministic": deterministic})
    selector = Selector(cfg, G, seed=0)
    selector.record(list(range(B - 1)), torch.rand((B - 1) * G, generator=gen))  # prompt B-1 stays unseen
    trials = 3000 if not deterministic else 5
    grads = []
    for step in range(trials):
        positions, prompt_w = selector.prune_prompts(step, list(range(B)))
        generated = [r for k in positions for r in rows[k * G:(k + 1) * G]]
        kept, sel = selector.completions(step, generated, prompt_w, drawn_prompts=B)
        assert sel.num_seqs == B * G  # the full batch's count, whatever was pruned
        grads.append(_surrogate_grad(theta, kept, sel.num_seqs) if kept else torch.zeros_like(full))
    grads = torch.stack(grads)
    error = (grads.mean(0) - full).abs()
    if deterministic:
        assert error.max() > 0.05 * full.abs().max(), "pruning the lowest scores exactly should bias the gradient"
    else:
        stderr = grads.std(0) / trials ** 0.5
        assert (error <= 4 * stderr + 1e-6).all(), f"bias {error} vs standard error {stderr}"
        assert grads.std(0).max() > 0, "the selection should be random"


@pytest.mark.parametrize("max_staleness", [1, 2, 3])
def test_one_step_off_schedule_bounds_staleness(max_staleness):
    """The async loop at step t: push weights if due (the learner holds version t-1), submit step t+1,
    train step t. Every trained sample lags by at most max_staleness, and pushes are as rare as that allows."""
    from rl.rollouts import weights_due

    engine_version, sampled_with, pushes, lags = 0, {1: 0}, [], []
    for step in range(1, 31):
        if weights_due(step - 1, engine_version, max_staleness):
            engine_version = step - 1
            pushes.append(step)
        sampled_with[step + 1] = engine_version
        lags.append((step - 1) - sampled_with[step])  # the learner trains step t from version t-1
    assert min(lags) >= 0 and max(lags) == max_staleness
    assert pushes == list(range(max_staleness + 1, 31, max_staleness))
