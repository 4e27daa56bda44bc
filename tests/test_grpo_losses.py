"""Tests for the GRPO family in minirlhf/losses.py: advantages, the policy loss and its aggregations,
truncation masking and DAPO's group filter.

Each function is checked on numbers worked out by hand (the derivation in a comment), gradients
included where a stop-gradient decides the update (CISPO, GSPO), and against TRL 1.16's own code on the
same tensors: GRPOTrainer._compute_loss, and the reward-to-advantage blocks of GRPOTrainer and
RLOOTrainer._generate_and_score_completions (see `trl_advantages` for how those are driven).
"""

import inspect
import math
import textwrap
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from minirlhf import losses as L

f64 = torch.float64
nan = float("nan")
EPS = 1e-4  # the advantage denominators' eps (TRL's)


def t64(*values):
    return torch.tensor(values, dtype=f64)


# ---------------------------------------------------------------------------------------------------
# advantages, by hand


def test_group_relative_advantages_hand_example():
    # group 1: [1, 0, 0, 1]: mean 1/2; unbiased std = sqrt(4 * (1/2)^2 / 3) = sqrt(1/3)
    # group 2: [2, 2, 2, 2]: every reward equals the mean -> 0 (std 0, the eps keeps it finite)
    r = t64(1, 0, 0, 1, 2, 2, 2, 2)
    s = math.sqrt(1 / 3)
    expected = t64(0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0)
    torch.testing.assert_close(L.group_relative_advantages(r, 4), expected / (s + EPS))
    # Dr. GRPO: no division
    torch.testing.assert_close(L.group_relative_advantages(r, 4, scale_rewards="none"), expected)
    # batch: group mean, std of all 8 rewards: mean 1.25, squared deviations
    # 2 * 0.0625 + 2 * 1.5625 + 4 * 0.5625 = 5.5, / 7 -> var 11/14
    torch.testing.assert_close(L.group_relative_advantages(r, 4, scale_rewards="batch"),
                               expected / (math.sqrt(11 / 14) + EPS))


def test_group_relative_advantages_skip_unscorable_rewards():
    # [1, NaN, 0, 0]: mean over the 3 scored = 1/3; deviations 2/3, -1/3, -1/3 -> unbiased var = (6/9) / 2
    # = 1/3. The NaN row gets 0. A group with one scored reward has no std (NaN) -> all 0.
    r = t64(1, nan, 0, 0, nan, 5, nan, nan)
    s = math.sqrt(1 / 3)
    got = L.group_relative_advantages(r, 4)
    torch.testing.assert_close(got, t64(2 / 3 / (s + EPS), 0, -1 / 3 / (s + EPS), -1 / 3 / (s + EPS), 0, 0, 0, 0))
    assert torch.isfinite(got).all()


def test_leave_one_out_advantages_hand_example():
    # [1, 0, 0, 1]: the others of a 1 average 1/3 -> 2/3; of a 0 average 2/3 -> -2/3
    # [1, NaN, 0, 0]: k = 3 scored; 1 - (0 + 0)/2 = 1; 0 - (1 + 0)/2 = -1/2; NaN -> 0
    # [NaN, 3, NaN, NaN]: one scored reward has nobody to compare with -> 0
    r = t64(1, 0, 0, 1, 1, nan, 0, 0, nan, 3, nan, nan)
    torch.testing.assert_close(L.leave_one_out_advantages(r, 4),
                               t64(2 / 3, -2 / 3, -2 / 3, 2 / 3, 1, 0, -0.5, -0.5, 0, 0, 0, 0))
    # equals the older NaN-free function where it applies
    torch.testing.assert_close(L.leave_one_out_advantages(r[:4], 4), L.rloo_advantages(r[:4], 4))


def test_weighted_sum_then_normalize_hand_example():
    # weights (1, 0.5); rows: (1, None) -> 1; (0, 1) -> 0.5; (None, None) -> unscorable; (1, 1) -> 1.5
    # the 3 scored sums 1, 0.5, 1.5: mean 1, unbiased std sqrt((0 + 0.25 + 0.25) / 2) = 0.5
    rewards = torch.tensor([[1, nan], [0, 1], [nan, nan], [1, 1]], dtype=f64)
    torch.testing.assert_close(L.weighted_reward_sum(rewards, [1.0, 0.5]), t64(1, 0.5, nan, 1.5), equal_nan=True)
    got = L.grpo_advantages(rewards, 4, [1.0, 0.5])
    torch.testing.assert_close(got, t64(0, -0.5 / (0.5 + EPS), 0, 0.5 / (0.5 + EPS)))


def test_normalize_then_sum_keeps_reward_combinations_apart():
    # Two groups of 2, two reward functions. Group 1: (1, 0) and (0, 0); group 2: (1, 1) and (0, 0).
    # Summing first gives totals [1, 0] and [2, 0], which group normalisation maps to the same +-a.
    # GDPO: per function and group, [1, 0] -> +-a with a = 0.5 / (sqrt(1/2) + eps), [0, 0] -> 0; so the
    # sums are [a, -a] and [2a, -2a]; over the batch mean 0, unbiased std a * sqrt((1 + 1 + 4 + 4) / 3).
    rewards = torch.tensor([[1, 0], [0, 0], [1, 1], [0, 0]], dtype=f64)
    summed = L.grpo_advantages(rewards, 2)
    torch.testing.assert_close(summed[:2], summed[2:], rtol=0, atol=1e-4)  # equal but for the eps
    a = 0.5 / (math.sqrt(0.5) + EPS)
    sd = a * math.sqrt(10 / 3)
    got = L.grpo_advantages(rewards, 2, aggregation="normalize_then_sum")
    torch.testing.assert_close(got, t64(a, -a, 2 * a, -2 * a) / (sd + EPS))


def test_advantage_options_are_checked():
    r = torch.zeros(4, 1)
    with pytest.raises(ValueError, match="scale_rewards"):
        L.grpo_advantages(r, 2, scale_rewards="groups")
    with pytest.raises(ValueError, match="normalize_then_sum"):
        L.grpo_advantages(r, 2, aggregation="normalize_then_sum", scale_rewards="none")
    with pytest.raises(ValueError, match="normalize_then_sum"):
        L.grpo_advantages(r, 2, aggregation="normalize_then_sum", estimator="rloo")
    with pytest.raises(ValueError, match="'none' or 'batch'"):
        L.grpo_advantages(r, 2, estimator="rloo")  # scale_rewards defaults to group
    with pytest.raises(ValueError, match="whole number of groups"):
        L.grpo_advantages(torch.zeros(5, 1), 2)
    with pytest.raises(ValueError, match="2 reward functions but 3 weights"):
        L.grpo_advantages(torch.zeros(4, 2), 2, [1.0, 1.0, 1.0])


def test_advantages_are_detached_and_keep_dtype():
    r = torch.tensor([[1.0], [0.0]], requires_grad=True)
    a = L.grpo_advantages(r, 2)
    assert not a.requires_grad and a.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------
# DAPO group filter, truncation mask


def test_informative_groups():
    rewards = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 0, 0], [nan, 1, 1], [nan, 1, 0], [nan, nan, 2], [0.5, 0.5, 0.6]])
    # mixed; all right; all wrong; the scored ones equal; scored ones differ; one scored; small spread
    assert L.informative_groups(rewards).tolist() == [True, False, False, False, True, False, True]
    assert L.informative_groups(rewards, tol=0.2).tolist() == [True, False, False, False, True, False, False]


def test_mask_truncated_completions():
    eos, pad = 2, 0
    ids = torch.tensor([[5, 6, eos, pad], [5, 6, 7, 8], [eos, pad, pad, pad], [5, eos, 9, pad]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    # row 1 never stops; row 3's "eos" lies inside its mask, so it stopped (the 9 is not generated)
    new_mask, truncated = L.mask_truncated_completions(ids, mask, eos)
    assert truncated.tolist() == [False, True, False, False]
    assert new_mask.dtype == torch.bool
    assert new_mask.tolist() == [[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]]
    # several stop ids, float mask
    _, truncated = L.mask_truncated_completions(ids, mask.float(), [7, 99])
    assert truncated.tolist() == [True, False, True, True]


# ---------------------------------------------------------------------------------------------------
# the policy loss, by hand
#
# Two completions, three positions. Ratios r = pi / pi_old:
#   row 0, A = +1: r = (1.5, 0.5, 1.0), all three tokens count
#   row 1, A = -1: r = (1.5, 0.5, -), the last position is padding
# eps_low = 0.2, eps_high = 0.28 (clip range [0.8, 1.28]); per token l = -min(r A, clip(r) A):
#   row 0: r = 1.5 -> -1.28 (clipped high); r = 0.5 -> -0.5; r = 1 -> -1.     sum -2.78
#   row 1: l = max(r, clip(r)): r = 1.5 -> 1.5; r = 0.5 -> 0.8 (clipped low).  sum  2.3


def hand_batch(dtype=f64):
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -1.0, -3.0]], dtype=dtype)
    ratios = torch.tensor([[1.5, 0.5, 1.0], [1.5, 0.5, 1.0]], dtype=dtype)
    logprobs = (old + ratios.log()).requires_grad_()
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    return logprobs, old, torch.tensor([1.0, -1.0], dtype=dtype), mask


CLIP = dict(epsilon_low=0.2, epsilon_high=0.28)


@pytest.mark.parametrize("loss_type, kwargs, expected", [
    ("grpo", {}, (-2.78 / 3 + 2.3 / 2) / 2),  # mean over rows of each row's token mean
    ("bnpo", {}, (-2.78 + 2.3) / 5),  # 5 tokens in the micro-batch
    ("dapo", {"num_items_in_batch": 10}, (-2.78 + 2.3) / 10),  # 10 tokens in the accumulated batch
    ("dapo", {}, (-2.78 + 2.3) / 5),  # no global count given: this micro-batch's
    ("dr_grpo", {"max_completion_length": 4}, (-2.78 + 2.3) / (2 * 4)),
])
def test_clipped_loss_aggregations_hand_example(loss_type, kwargs, expected):
    logprobs, old, adv, mask = hand_batch()
    loss, stats = L.grpo_policy_loss(logprobs, old, adv, mask, loss_type=loss_type, **CLIP, **kwargs)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # 1 of 5 tokens clipped low (row 1, r = 0.5), 1 clipped high (row 0, r = 1.5); mean ratio 5/5
    assert stats["clip_low"].item() == pytest.approx(0.2)
    assert stats["clip_high"].item() == pytest.approx(0.2)
    assert stats["clip_region"].item() == pytest.approx(0.4)
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    assert "kl" not in stats and not any(s.requires_grad for s in stats.values())


def test_clipped_loss_gradient_hand_example():
    # grpo aggregation: d loss / d log pi_t = (d l_t / d r_t) * r_t / (tokens of the row * rows).
    # row 0 (3 tokens): r = 1.5 clipped -> 0; l = -r at r = 0.5 -> -0.5 / 6; at r = 1 -> -1 / 6.
    # row 1 (2 tokens): l = r at r = 1.5 -> 1.5 / 4; r = 0.5 is clipped (l = 0.8) -> 0; padding -> 0.
    logprobs, old, adv, mask = hand_batch()
    loss, _ = L.grpo_policy_loss(logprobs, old, adv, mask, loss_type="grpo", **CLIP)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0, -0.5 / 6, -1 / 6], [1.5 / 4, 0, 0]], dtype=f64))


def test_two_sided_clipping_delta():
    # delta = 1.4 caps the unclipped ratio: row 1, r = 1.5, A = -1 -> l = max(min(1.5, 1.4), 1.28) = 1.4,
    # with no gradient. Everything else as in the hand example: bnpo loss (-2.78 + 2.2) / 5.
    logprobs, old, adv, mask = hand_batch()
    loss, _ = L.grpo_policy_loss(logprobs, old, adv, mask, loss_type="bnpo", delta=1.4, **CLIP)
    assert loss.item() == pytest.approx((-2.78 + 2.2) / 5, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0, -0.5 / 5, -1 / 5], [0, 0, 0]], dtype=f64))


def test_cispo_weights_are_clipped_and_detached():
    # CISPO: l_t = -sg(min(r_t, 1 + eps_high)) A log pi_t, here with eps_high = 0.28 (cap 1.28):
    # weights row 0: (1.28, 0.5, 1), row 1: (1.28, 0.5). bnpo-style mean over 5 tokens (no global count).
    # value: -(1/5) [sum_t w A log pi]; gradient: -w A / 5 per token, nothing through w.
    logprobs, old, adv, mask = hand_batch()
    w = torch.tensor([[1.28, 0.5, 1.0], [1.28, 0.5, 0.0]], dtype=f64)
    lp = logprobs.detach()
    expected = -(w * adv[:, None] * lp * mask).sum() / 5
    loss, stats = L.grpo_policy_loss(logprobs, old, adv, mask, loss_type="cispo", **CLIP)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, -w * adv[:, None] / 5)
    # the weight is capped on both rows' r = 1.5 tokens, whatever the advantage's sign
    assert stats["clip_high"].item() == pytest.approx(0.4) and stats["clip_low"].item() == 0.0


def test_gspo_sequence_ratio_value_and_gradient():
    # GSPO: s_i = exp(mean_t log r_it): row 0: (1.5 * 0.5 * 1)^(1/3) = 0.75^(1/3); row 1: 0.75^(1/2).
    # Both lie in [0.8, 1.2], so nothing is clipped and, with grpo aggregation, loss = mean_i(-s_i A_i).
    # GSPO-token gives each token the gradient s_i * grad log pi: d loss / d log pi_it = -A_i s_i / (n_i * 2).
    logprobs, old, adv, mask = hand_batch()
    s0, s1 = 0.75 ** (1 / 3), 0.75**0.5
    loss, stats = L.grpo_policy_loss(logprobs, old, adv, mask, loss_type="grpo", importance_sampling_level="sequence")
    assert loss.item() == pytest.approx((-s0 + s1) / 2, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-s0 / 6] * 3, [s1 / 4, s1 / 4, 0]], dtype=f64))
    assert stats["ratio_mean"].item() == pytest.approx((s0 + s1) / 2)  # one value per sequence
    # eps_low = 0.1: row 1 (s = 0.866 < 0.9, A < 0) is clipped as a whole -> no gradient, 1 of 2 sequences
    logprobs.grad = None
    loss, stats = L.grpo_policy_loss(logprobs, old, adv, mask, loss_type="grpo", importance_sampling_level="sequence",
                                     epsilon_low=0.1)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-s0 / 6] * 3, [0, 0, 0]], dtype=f64))
    assert stats["clip_low"].item() == pytest.approx(0.5)


def test_k3_kl_term_per_token():
    # ref = log pi + ln 2 on every token: k3 = e^d - d - 1 with d = ln 2 -> 1 - ln 2. With beta = 0.1 the
    # bnpo loss gains 0.1 * (1 - ln 2) (a token mean of a constant); the gradient of k3 w.r.t. log pi is
    # 1 - e^d = -1, so each of the 5 tokens' gradient moves by 0.1 * (-1) / 5.
    logprobs, old, adv, mask = hand_batch()
    ref = logprobs.detach() + math.log(2.0)
    base, _ = L.grpo_policy_loss(logprobs, old, adv, mask, loss_type="bnpo", **CLIP)
    base.backward()
    base_grad, logprobs.grad = logprobs.grad.clone(), None
    loss, stats = L.grpo_policy_loss(logprobs, old, adv, mask, loss_type="bnpo", beta=0.1, ref_logprobs=ref,
                                     **CLIP)
    k3 = 1 - math.log(2.0)
    assert loss.item() == pytest.approx(base.item() + 0.1 * k3, abs=1e-12)
    assert stats["kl"].item() == pytest.approx(k3)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, base_grad - 0.1 / 5 * mask)


def test_on_policy_step_ratio_is_one_and_gradient_is_reinforce():
    # old = the detached current log-probs (mu = 1): r = 1, nothing clips, and the grpo loss's gradient is
    # -A / (n_i * B) per token: REINFORCE with the group baseline.
    logprobs, _, adv, mask = hand_batch()
    loss, stats = L.grpo_policy_loss(logprobs, logprobs.detach(), adv, mask, loss_type="grpo")
    assert loss.item() == pytest.approx(0.0)  # row means -1 and +1
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1 / 6] * 3, [1 / 4, 1 / 4, 0]], dtype=f64))
    assert stats["clip_region"].item() == 0.0 and stats["ratio_mean"].item() == 1.0


def test_policy_loss_per_token_advantages_and_dtype():
    logprobs, old, adv, mask = hand_batch(torch.float32)
    loss_b, _ = L.grpo_policy_loss(logprobs, old, adv, mask)
    loss_bt, _ = L.grpo_policy_loss(logprobs, old, adv[:, None].expand(2, 3), mask)
    assert loss_b.dtype == torch.float32
    torch.testing.assert_close(loss_b, loss_bt)


def test_policy_loss_stays_finite_on_extreme_ratios():
    # log-ratios of +-1000 (a diverged token, padding junk) are clamped at +-20 before exp
    logprobs = torch.tensor([[0.0, -1000.0]], requires_grad=True)
    old = torch.tensor([[-1000.0, 0.0]])
    for loss_type in ("grpo", "cispo"):
        loss, stats = L.grpo_policy_loss(logprobs, old, torch.tensor([1.0]), torch.ones(1, 2), loss_type=loss_type)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logprobs.grad).all()
        assert all(torch.isfinite(v) for v in stats.values())
        logprobs.grad = None


def test_policy_loss_options_are_checked():
    logprobs, old, adv, mask = hand_batch()
    for kwargs, match in [
        ({"loss_type": "ppo"}, "loss_type"),
        ({"importance_sampling_level": "seq"}, "importance_sampling_level"),
        ({"loss_type": "dr_grpo"}, "max_completion_length"),
        ({"beta": 0.1}, "ref_logprobs"),
        ({"delta": 0.9}, "delta"),
        ({"loss_type": "cispo", "delta": 2.0}, "delta"),
        ({"epsilon_low": 1.0}, "epsilon_low"),
    ]:
        with pytest.raises(ValueError, match=match):
            L.grpo_policy_loss(logprobs, old, adv, mask, **kwargs)


# ---------------------------------------------------------------------------------------------------
# TRL 1.16 as the oracle


@pytest.fixture(scope="module")
def trl():
    return pytest.importorskip("trl")


class _OneProcess:
    """The accelerator calls _compute_loss makes, for a single process."""

    num_processes = 1

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    gather_for_metrics = gather


def trl_loss(GRPOTrainer, logprobs, old, adv, mask, *, loss_type, epsilon_low, epsilon_high, level, beta, ref,
             delta, num_items, max_len):
    """TRL's GRPOTrainer._compute_loss on our tensors. A real trainer needs a model, data and generation;
    _compute_loss only reads the attributes set here and gets its log-probs from
    _get_per_token_logps_and_entropies, which we replace by one returning `logprobs` (a leaf, so the
    gradient can be compared), so an object made with object.__new__ runs the real loss code."""
    trainer = object.__new__(GRPOTrainer)
    B, T = logprobs.shape
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logprobs, torch.zeros(B, T, dtype=logprobs.dtype),
                                                                   None)
    attributes = dict(
        top_entropy_quantile=1.0, aux_loss_enabled=False, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=epsilon_low,
        epsilon_high=epsilon_high, use_vllm=False, vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=1, max_completion_length=max_len, accelerator=_OneProcess(),
        _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        model=SimpleNamespace(training=True),
        args=SimpleNamespace(use_bias_correction_kl=False, delta=delta, steps_per_generation=1),
    )
    for k, v in attributes.items():
        setattr(trainer, k, v)
    inputs = dict(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1),
                  completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=mask.to(logprobs.dtype),
                  advantages=adv, old_per_token_logps=old, ref_per_token_logps=ref,
                  num_items_in_batch=torch.tensor(float(num_items)))
    loss = trainer._compute_loss(None, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def random_batch(seed, B=6, T=7, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=f64) * 3
    logprobs = old + spread * torch.randn(B, T, generator=g, dtype=f64)
    ref = old + 0.3 * torch.randn(B, T, generator=g, dtype=f64)
    adv = torch.randn(B, generator=g, dtype=f64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]  # right padded, no empty row
    return logprobs, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo", "cispo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta, delta", [(0.0, None), (0.04, 1.5)])
def test_policy_loss_matches_trl(trl, loss_type, level, beta, delta):
    if loss_type == "cispo":
        delta = None  # TRL ignores delta for cispo; ours rejects it
    # spread 0.4 on the token log-ratios: a good share of tokens (and of sequences) ends up clipped
    base, old, ref, adv, mask = random_batch(seed=0, spread=0.4)
    eps_low, eps_high = 0.2, 0.28
    num_items, max_len = 60, 9  # a larger accumulated batch than this micro-batch; a budget above T

    ours_lp = base.clone().requires_grad_()
    ours, stats = L.grpo_policy_loss(
        ours_lp, old, adv, mask, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high,
        importance_sampling_level=level, delta=delta, beta=beta, ref_logprobs=ref if beta else None,
        num_items_in_batch=num_items, max_completion_length=max_len)
    ours.backward()

    trl_lp = base.clone().requires_grad_()
    # TRL's cispo takes the cap on the weight itself as epsilon_high; ours takes 1 + epsilon_high
    theirs, metrics = trl_loss(
        trl.GRPOTrainer, trl_lp, old, adv, mask, loss_type=loss_type, epsilon_low=eps_low,
        epsilon_high=1 + eps_high if loss_type == "cispo" else eps_high, level=level, beta=beta,
        ref=ref if beta else None, delta=delta, num_items=num_items, max_len=max_len)
    theirs.backward()

    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_lp.grad, trl_lp.grad, rtol=1e-10, atol=1e-12)
    assert trl_lp.grad.abs().sum() > 0
    if loss_type != "cispo":
        assert stats["clip_low"].item() == pytest.approx(metrics["clip_ratio/low_mean"])
        assert stats["clip_high"].item() == pytest.approx(metrics["clip_ratio/high_mean"])
        assert stats["clip_region"].item() == pytest.approx(metrics["clip_ratio/region_mean"])
        # the data must exercise the clipping for this comparison to mean anything (seed 0: 29% of the
        # tokens, 1 of 6 sequences)
        assert metrics["clip_ratio/region_mean"] > 0
    if beta:
        assert stats["kl"].item() == pytest.approx(metrics["kl"])


def trl_advantages(trainer_cls, self, rewards_per_func):
    """Run the rewards-to-advantages block of trainer_cls._generate_and_score_completions (the lines from
    `unscorable_mask = ...` to `advantages = torch.nan_to_num(...)`) on `rewards_per_func`, with `self`
    standing in for the trainer.

    That method also tokenizes, generates and scores, so it cannot run without a full trainer; the block
    reads only the rewards, a few attributes of `self` and `num_generations`, so we take its source text
    from TRL and execute exactly that. If TRL rewrites the block, the markers are not found and the test
    fails, telling us to look again."""
    from trl.trainer.utils import nanstd

    start, end = "unscorable_mask = torch.isnan(rewards_per_func)", "advantages = torch.nan_to_num(advantages, nan=0.0)"
    lines = inspect.getsource(trainer_cls._generate_and_score_completions).splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip().startswith(start)), None)
    last = next((i for i, line in enumerate(lines) if first is not None and i > first and line.strip() == end), None)
    assert first is not None and last is not None, f"TRL's {trainer_cls.__name__} changed: block not found"
    namespace = dict(torch=torch, nanstd=nanstd, self=self, rewards_per_func=rewards_per_func.clone(),
                     num_generations=4, device="cpu")
    exec(textwrap.dedent("\n".join(lines[first: last + 1])), namespace)
    return namespace["advantages"]


def reward_table(seed, groups=4, G=4, F=2):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 3, (groups * G, F), generator=g).float()  # ties, as with 0/1 rewards
    rewards[torch.rand(groups * G, F, generator=g) < 0.2] = nan  # None from a function
    rewards[3] = nan  # a completion nobody scored
    rewards[G: 2 * G] = 1.0  # a group whose rewards are all equal
    rewards[2 * G: 2 * G + G - 1, 1] = nan  # a function scoring one completion of its group
    return rewards


@pytest.mark.parametrize("aggregation, scale_rewards", [
    ("sum_then_normalize", "group"), ("sum_then_normalize", "batch"), ("sum_then_normalize", "none"),
    ("normalize_then_sum", "group"),
])
def test_grpo_advantages_match_trl(trl, aggregation, scale_rewards):
    rewards, weights = reward_table(seed=3), torch.tensor([1.0, 0.5])  # groups of 4
    ours = L.grpo_advantages(rewards, 4, weights, aggregation=aggregation, scale_rewards=scale_rewards)
    self = SimpleNamespace(multi_objective_aggregation=aggregation, scale_rewards=scale_rewards,
                           reward_weights=weights, reward_funcs=[None, None])
    theirs = trl_advantages(trl.GRPOTrainer, self, rewards)
    torch.testing.assert_close(ours, theirs)
    assert ours.abs().sum() > 0


@pytest.mark.parametrize("scale_rewards, normalize", [("none", False), ("batch", True)])
def test_rloo_advantages_match_trl(trl, scale_rewards, normalize):
    rewards, weights = reward_table(seed=5), torch.tensor([0.7, 1.0])  # groups of 4
    ours = L.grpo_advantages(rewards, 4, weights, estimator="rloo", scale_rewards=scale_rewards)
    self = SimpleNamespace(reward_weights=weights, reward_clip_range=None, beta=0.0, normalize_advantages=normalize)
    theirs = trl_advantages(trl.RLOOTrainer, self, rewards)
    torch.testing.assert_close(ours, theirs)
    assert ours.abs().sum() > 0
