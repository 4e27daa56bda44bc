"""Tests for minirlhf/losses.py: hand-derived values (derivations in comments), float64 references written
independently of the implementation, Hugging Face's causal-LM loss as an oracle, extreme inputs,
gradcheck, dtype preservation and bool-vs-float masks."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from minirlhf import losses as L

f64 = torch.float64


def t64(*values):
    return torch.tensor(values, dtype=f64)


def assert_finite(*tensors):
    for x in tensors:
        assert torch.isfinite(x).all(), x


# ---------------------------------------------------------------------------------------------------
# token log-probs / lm loss / sequence log-probs


def test_lm_loss_hand_example():
    # position 0: logits (0, 0) -> p(label 0) = 1/2 -> nll = ln 2
    # position 1: logits (ln 3, 0) -> p(label 0) = 3/4 -> nll = ln(4/3)
    # position 2: ignored. mean over 2 tokens = (ln 2 + ln 4/3) / 2 = ln(8/3) / 2
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]], dtype=f64)
    labels = torch.tensor([[0, 0, -100]])
    assert L.lm_loss(logits, labels).item() == pytest.approx(math.log(8 / 3) / 2, rel=1e-12)


def test_lm_loss_matches_transformers_causal_lm_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V, generator=g)
    tokens = torch.randint(0, V, (B, T), generator=g)
    tokens[0, :3] = -100  # prompt tokens masked
    tokens[2, 5:] = -100  # padding
    # HF shifts internally; ours takes labels already aligned with logits.
    shifted = F.pad(tokens, (0, 1), value=-100)[:, 1:]
    ours = L.lm_loss(logits, shifted)
    theirs = ForCausalLMLoss(logits, tokens, vocab_size=V)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_lm_loss_all_ignored_is_zero_not_nan():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = L.lm_loss(logits, torch.full((2, 3), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_lm_loss_bfloat16_logits_are_promoted():
    logits = torch.randn(2, 4, 9).to(torch.bfloat16)
    labels = torch.randint(0, 9, (2, 4))
    out = L.lm_loss(logits, labels)
    assert out.dtype == torch.float32
    ref = -torch.log_softmax(logits.to(f64), -1).gather(-1, labels[..., None]).mean()
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)


def test_token_logps_temperature_hand_example():
    # logits (2, 0) at temperature 2 -> (1, 0): log p(0) = 1 - ln(e + 1), log p(1) = -ln(e + 1)
    logits = torch.tensor([[[2.0, 0.0], [2.0, 0.0], [2.0, 0.0]]], dtype=f64)
    labels = torch.tensor([[0, 1, -100]])
    out = L.token_logps(logits, labels, temperature=2.0)
    expected = t64(1 - math.log(math.e + 1), -math.log(math.e + 1), 0.0)[None]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_token_logps_matches_float64_log_softmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 13, generator=g) * 30  # wide logits: log-probs down to about -200
    labels = torch.randint(0, 13, (2, 5), generator=g)
    ref = torch.log_softmax(logits.to(f64) / 0.7, -1).gather(-1, labels[..., None]).squeeze(-1)
    out = L.token_logps(logits, labels, temperature=0.7)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.to(f64), ref, rtol=1e-5, atol=1e-4)


def test_sequence_logps_sum_and_average_bool_and_float_masks():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 6, dtype=f64, generator=g)
    labels = torch.randint(0, 6, (2, 4), generator=g)
    mask = torch.tensor([[False, True, True, True], [True, True, False, False]])
    labels = labels.masked_fill(~mask, -100)  # anything may sit under the mask
    lp = torch.log_softmax(logits, -1)
    tok = [[lp[b, t, labels[b, t]].item() if mask[b, t] else 0.0 for t in range(4)] for b in range(2)]
    sums = t64(sum(tok[0]), sum(tok[1]))
    avgs = t64(sum(tok[0]) / 3, sum(tok[1]) / 2)
    for m in (mask, mask.to(f64), mask.float()):
        torch.testing.assert_close(L.sequence_logps(logits, labels, m), sums)
        torch.testing.assert_close(L.sequence_logps(logits, labels, m, average=True), avgs)


def test_sequence_logps_gradcheck():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 4, dtype=f64, generator=g, requires_grad=True)
    labels = torch.randint(0, 4, (2, 3), generator=g)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert gradcheck(lambda x: L.sequence_logps(x, labels, mask, average=True), (logits,))


# ---------------------------------------------------------------------------------------------------
# reward model


def test_reward_pair_loss_hand_values_and_kinds_agree():
    # chosen - rejected = 1: -log sigmoid(1) = ln(1 + e^-1) = 0.31326168751822286
    # with margin 1 the argument is 0: ln 2. Mean over the batch of both.
    chosen, rejected = t64(1.0, 3.0), t64(0.0, 2.0)
    expected = math.log(1 + math.exp(-1))
    for kind in ("log_sig", "log_exp"):
        assert L.reward_pair_loss(chosen, rejected, kind=kind).item() == pytest.approx(expected, rel=1e-12)
        assert L.reward_pair_loss(chosen, rejected, kind=kind, margin=1.0).item() == pytest.approx(math.log(2))
        per_row = L.reward_pair_loss(chosen, rejected, kind=kind, margin=t64(1.0, -1.0))
        # row 2: argument 1 + 1 = 2 -> ln(1 + e^-2)
        assert per_row.item() == pytest.approx((math.log(2) + math.log(1 + math.exp(-2))) / 2, rel=1e-12)
    with pytest.raises(ValueError, match="kind"):
        L.reward_pair_loss(chosen, rejected, kind="hinge")


def test_reward_pair_loss_extreme_rewards():
    # -log sigmoid(200) = ln(1 + e^-200) ~ e^-200 (0 in float32); -log sigmoid(-200) = 200 + ln(1 + e^-200) = 200
    for kind in ("log_sig", "log_exp"):
        good = L.reward_pair_loss(torch.tensor([100.0]), torch.tensor([-100.0]), kind=kind)
        bad = L.reward_pair_loss(torch.tensor([-100.0]), torch.tensor([100.0]), kind=kind)
        assert good.item() == pytest.approx(0.0, abs=1e-30) and bad.item() == pytest.approx(200.0, rel=1e-7)
        c = torch.tensor([-100.0, 100.0], requires_grad=True)
        L.reward_pair_loss(c, torch.tensor([100.0, -100.0]), kind=kind).backward()
        # d/dc of the mean: -sigmoid(-(c - r)) / 2 -> -1/2 for the losing row, ~0 for the winning one
        torch.testing.assert_close(c.grad, torch.tensor([-0.5, 0.0]), atol=1e-7, rtol=0)


# ---------------------------------------------------------------------------------------------------
# DPO family


def _dpo_inputs():
    # h = (pc - rc) - (pr - rr) = (-1 + 2) - (-3 + 2) = 2
    return t64(-1.0), t64(-3.0), t64(-2.0), t64(-2.0)


def test_dpo_sigmoid_hand_values():
    pc, pr, rc, rr = _dpo_inputs()
    # beta * h = 0.5 * 2 = 1: -log sigmoid(1) = ln(1 + e^-1)
    losses, cr, rj = L.dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-12)
    # rewards: 0.5 * (-1 + 2) = 0.5 and 0.5 * (-3 + 2) = -0.5
    assert cr.item() == pytest.approx(0.5) and rj.item() == pytest.approx(-0.5)
    # conservative DPO, ls = 0.2: 0.8 ln(1 + e^-1) + 0.2 ln(1 + e^1) = 0.5132616875182229
    losses, _, _ = L.dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.2)
    assert losses.item() == pytest.approx(0.8 * math.log(1 + math.exp(-1)) + 0.2 * math.log(1 + math.e), rel=1e-12)


def test_dpo_hinge_and_ipo_hand_values():
    pc, pr, rc, rr = _dpo_inputs()
    # hinge: relu(1 - beta h): beta 0.5 -> relu(0) = 0; beta 0.1 -> 1 - 0.2 = 0.8; beta 1 -> relu(-1) = 0
    assert L.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="hinge")[0].item() == 0.0
    assert L.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="hinge")[0].item() == pytest.approx(0.8)
    assert L.dpo_loss(pc, pr, rc, rr, beta=1.0, loss_type="hinge")[0].item() == 0.0
    # ipo: (h - 1/(2 beta))^2: beta 0.5 -> (2 - 1)^2 = 1; beta 0.1 -> (2 - 5)^2 = 9
    assert L.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")[0].item() == pytest.approx(1.0)
    assert L.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")[0].item() == pytest.approx(9.0)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_variants_match_formula_on_random_inputs(loss_type):
    # Float64 references written straight from the papers (naive forms are exact at these magnitudes).
    g = torch.Generator().manual_seed(4)
    pc, pr, rc, rr = (torch.randn(16, dtype=f64, generator=g) * 3 - 20 for _ in range(4))
    beta, ls = 0.3, 0.1 if loss_type == "sigmoid" else 0.0  # label smoothing is refused for hinge and ipo
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        sig = lambda x: 1 / (1 + torch.exp(-x))  # noqa: E731
        ref = -(1 - ls) * torch.log(sig(beta * h)) - ls * torch.log(sig(-beta * h))
    elif loss_type == "hinge":
        ref = torch.clamp(1 - beta * h, min=0)
    else:
        ref = (h - 1 / (2 * beta)) ** 2
    losses, cr, rj = L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=ls)
    torch.testing.assert_close(losses, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cr, beta * (pc - rc))
    torch.testing.assert_close(rj, beta * (pr - rr))


def test_dpo_rewards_detached_losses_differentiable_and_gradcheck():
    g = torch.Generator().manual_seed(5)
    pc, pr = (torch.randn(4, dtype=f64, generator=g, requires_grad=True) for _ in range(2))
    rc, rr = (torch.randn(4, dtype=f64, generator=g) for _ in range(2))
    losses, cr, rj = L.dpo_loss(pc, pr, rc, rr, beta=0.7, label_smoothing=0.1)
    assert losses.requires_grad and not cr.requires_grad and not rj.requires_grad
    assert gradcheck(lambda a, b: L.dpo_loss(a, b, rc, rr, beta=0.7, label_smoothing=0.1)[0], (pc, pr))
    assert gradcheck(lambda a, b: L.dpo_loss(a, b, rc, rr, beta=0.7, loss_type="ipo")[0], (pc, pr))


def test_dpo_extreme_log_probs_and_bad_args():
    # policy log-probs near 0 and -1e3: beta*h = 0.1 * (+-1000) -> loss ~0 or exactly 100
    pc, pr = torch.tensor([-1e-6, -1e3]), torch.tensor([-1e3, -1e-6])
    ref = torch.tensor([-5.0, -5.0])
    losses, cr, rj = L.dpo_loss(pc, pr, ref, ref, beta=0.1)
    assert_finite(losses, cr, rj)
    assert losses[0].item() == pytest.approx(0.0, abs=1e-30) and losses[1].item() == pytest.approx(100.0, rel=1e-6)
    with pytest.raises(ValueError, match="loss_type"):
        L.dpo_loss(pc, pr, ref, ref, loss_type="kto")
    with pytest.raises(ValueError, match="beta"):
        L.dpo_loss(pc, pr, ref, ref, beta=0.0)


@pytest.mark.parametrize("loss_type", ["hinge", "ipo"])
def test_dpo_label_smoothing_refused_where_undefined(loss_type):
    # SLiC's hinge and IPO define no label-noise term (nor does TRL 1.16 for them): a nonzero value used to
    # be ignored without a word; 0 still works.
    pc, pr, rc, rr = _dpo_inputs()
    with pytest.raises(ValueError, match="label_smoothing.*sigmoid"):
        L.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type=loss_type, label_smoothing=0.1)
    assert torch.isfinite(L.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type=loss_type, label_smoothing=0.0)[0]).all()


def test_simpo_hand_value_and_extremes():
    # beta (c - r) - gamma = 2 * (-1 + 2) - 0.5 = 1.5: -log sigmoid(1.5) = ln(1 + e^-1.5) = 0.20141327798275246
    out = L.simpo_loss(t64(-1.0), t64(-2.0), beta=2.0, gamma=0.5)
    assert out.item() == pytest.approx(math.log(1 + math.exp(-1.5)), rel=1e-12)
    # c = -1e3, r = 0: argument -2000.5 -> loss 2000.5 exactly
    out = L.simpo_loss(torch.tensor([-1e3, 0.0]), torch.tensor([0.0, -1e3]))
    assert_finite(out)
    assert out[0].item() == pytest.approx(2000.5) and out[1].item() == pytest.approx(0.0, abs=1e-30)


# ---------------------------------------------------------------------------------------------------
# ORPO


def _naive_log_odds64(p):
    return p - torch.log(1 - torch.exp(p))


def test_orpo_hand_value():
    # p_w = ln 1/2 -> odds 1 -> log odds 0; p_l = ln 1/4 -> odds (1/4)/(3/4) = 1/3 -> log odds -ln 3.
    # ratio = ln 3, log sigmoid(ln 3) = ln(3/4); loss = nll - beta ln(3/4) = 2 + 0.1 ln(4/3)
    out = L.orpo_loss(t64(math.log(0.5)), t64(math.log(0.25)), t64(2.0), beta=0.1)
    assert out.item() == pytest.approx(2 + 0.1 * math.log(4 / 3), rel=1e-12)


def test_orpo_matches_float64_reference_in_float32_near_zero():
    # float32 p = -1e-6: the naive log1p(-exp(p)) loses most digits (exp(p) is 1 - 1e-6 rounded to 2^-24);
    # log(-expm1(p)) keeps them. Reference: naive formula in float64, exact to ~1e-10 here.
    # (c, r) = (-1e-6, -3e-6): the naive float32 log odds are off by +0.013 and -0.007, ratio by 0.02.
    c = torch.tensor([-1e-6, -1e-3, -0.3, -2.0, -50.0])
    r = torch.tensor([-3e-6, -0.5, -0.7, -1.0, -60.0])
    nll = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    out = L.orpo_loss(c, r, nll, beta=0.5)
    assert out.dtype == torch.float32
    ref = nll.to(f64) - 0.5 * F.logsigmoid(_naive_log_odds64(c.to(f64)) - _naive_log_odds64(r.to(f64)))
    torch.testing.assert_close(out.to(f64), ref, rtol=1e-5, atol=1e-6)


def test_orpo_extremes_finite_with_correct_limits():
    # p = 0 exactly is read as p = -tiny (the smallest normal magnitude): log odds(-tiny) = -ln(tiny) + O(tiny)
    # (87.3 in float32, 708.4 in float64). p_w = 0, p_l = -1e3: log odds(p_l) = -1e3 -> loss -> nll.
    # p_w = -1e3, p_l = 0: ratio = -1e3 + ln(tiny) -> loss = nll + beta * (1e3 - ln tiny)
    # (log sigmoid(x) ~ x for x << 0).
    for dtype in (torch.float32, f64):
        c = torch.tensor([0.0, -1e3, -1e-30], dtype=dtype, requires_grad=True)
        r = torch.tensor([-1e3, 0.0, -1e3], dtype=dtype, requires_grad=True)
        nll = torch.tensor([1.0, 1.0, 1.0], dtype=dtype)
        out = L.orpo_loss(c, r, nll, beta=0.1)
        out.sum().backward()
        assert_finite(out, c.grad, r.grad)
        big = -math.log(torch.finfo(dtype).tiny) + 1e3
        assert out[0].item() == pytest.approx(1.0, abs=1e-6)
        assert out[1].item() == pytest.approx(1.0 + 0.1 * big, rel=1e-5)
        # at the guard only the p term of log odds = p - log(1 - e^p) carries gradient: d/dp_l of
        # -beta log sigmoid(lo_w - lo_l) = beta sigmoid(lo_l - lo_w) = beta (to 1e-400)
        assert r.grad[1].item() == pytest.approx(0.1, rel=1e-6)


def test_orpo_exact_for_average_log_probs_next_to_zero():
    # Regression: p was clamped to -eps (1.2e-7 in float32), which moved the loss of a pair whose rejected
    # answer has p = -1e-8 by 0.25 (first pair: 1.7190 instead of 1.9668). Reference: float64 math.expm1,
    # exact for these p (log(1 - e^p) = log(-expm1(p)) has no cancellation).
    def log_odds(p):
        return p - math.log(-math.expm1(p))

    chosen, rejected, beta = [-1.5, -0.7, -2.0, -1e-9], [-1e-8, -1e-12, -3e-8, -1e-30], 0.1
    ref = [-beta * -math.log1p(math.exp(-(log_odds(c) - log_odds(r)))) for c, r in zip(chosen, rejected)]
    for dtype in (torch.float32, f64):
        out = L.orpo_loss(torch.tensor(chosen, dtype=dtype), torch.tensor(rejected, dtype=dtype),
                          torch.zeros(4, dtype=dtype), beta=beta)
        torch.testing.assert_close(out.to(f64), torch.tensor(ref, dtype=f64), rtol=1e-5, atol=0)
    assert ref[0] == pytest.approx(1.9668, abs=1e-4)


def test_orpo_gradcheck():
    c = t64(-0.2, -1.5, -3.0).requires_grad_()
    r = t64(-0.9, -0.1, -4.0).requires_grad_()
    nll = t64(0.5, 1.0, 2.0).requires_grad_()
    assert gradcheck(lambda a, b, n: L.orpo_loss(a, b, n, beta=0.3), (c, r, nll))


def test_log1mexp_both_branches_against_float64():
    # Reference in 50-digit arithmetic (mpmath ships with torch's sympy dependency). No single float64
    # formula will do: log(-expm1(x)) loses digits at x = -30, log1p(-exp(x)) at x = -1e-7.
    import mpmath

    mpmath.mp.dps = 50
    xs = [-1e-7, -1e-3, -0.5, -0.7, -1.0, -30.0, -1e3]
    ref = torch.tensor([float(mpmath.log(1 - mpmath.exp(mpmath.mpf(v)))) for v in xs], dtype=f64)
    torch.testing.assert_close(L.log1mexp(torch.tensor(xs, dtype=f64)), ref, rtol=1e-14, atol=1e-300)
    torch.testing.assert_close(L.log1mexp(torch.tensor(xs)).to(f64), ref, rtol=1e-6, atol=1e-30)


def test_log1mexp_exact_next_to_zero_and_finite_at_zero():
    # log(1 - e^x) = log(-expm1(x)) ~ log(-x) for tiny x; mpmath as above.
    import mpmath

    mpmath.mp.dps = 50
    xs = [-1e-8, -1e-20, -1e-300]
    ref = torch.tensor([float(mpmath.log(-mpmath.expm1(mpmath.mpf(v)))) for v in xs], dtype=f64)
    torch.testing.assert_close(L.log1mexp(torch.tensor(xs, dtype=f64)), ref, rtol=1e-14, atol=0)
    torch.testing.assert_close(L.log1mexp(torch.tensor(xs[:2])).to(f64), ref[:2], rtol=1e-6, atol=0)
    for dtype in (torch.float32, f64):
        x = torch.tensor([0.0, -1e-3], dtype=dtype, requires_grad=True)
        y = L.log1mexp(x)
        y.sum().backward()
        assert y[0].item() == pytest.approx(math.log(torch.finfo(dtype).tiny), rel=1e-6)
        assert_finite(y, x.grad)


# ---------------------------------------------------------------------------------------------------
# KTO


def test_kto_hand_values():
    # r = -1 - (-2) = 1, z0 = 0.5, beta = 1
    # desirable: 1 - sigmoid(0.5) = sigmoid(-0.5) = 0.37754066879814546
    # undesirable with w_U = 2: 2 (1 - sigmoid(0.5 - 1)) = 2 sigmoid(0.5) = 1.2449186624037092
    pol, ref = t64(-1.0, -1.0), t64(-2.0, -2.0)
    out = L.kto_loss(pol, ref, torch.tensor([True, False]), t64(0.5), beta=1.0, undesirable_weight=2.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    torch.testing.assert_close(out, t64(sig(-0.5), 2 * sig(0.5)))
    # float 0/1 "desirable" and a python-float kl give the same
    out2 = L.kto_loss(pol, ref, t64(1.0, 0.0), 0.5, beta=1.0, undesirable_weight=2.0)
    torch.testing.assert_close(out, out2)
    # negative kl is clamped to 0: desirable 1 - sigmoid(1) = sigmoid(-1)
    out3 = L.kto_loss(pol[:1], ref[:1], torch.tensor([True]), -3.0, beta=1.0, desirable_weight=1.5)
    assert out3.item() == pytest.approx(1.5 * sig(-1.0), rel=1e-12)


def test_kto_kl_is_detached_and_extremes():
    kl = torch.tensor(0.3, requires_grad=True)
    pol = torch.tensor([-1e3, -1e-6, -1e3, -1e-6], requires_grad=True)
    ref = torch.tensor([-1e-6, -1e3, -1e-6, -1e3])
    des = torch.tensor([True, True, False, False])
    out = L.kto_loss(pol, ref, des, kl, beta=0.1)
    out.sum().backward()
    assert kl.grad is None and torch.isfinite(pol.grad).all()
    # r = -1e3 desirable -> 1; r = +1e3 desirable -> ~0; undesirable mirrored
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0, 0.0, 1.0]), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------
# PPO rewards, GAE, objectives


def test_kl_penalized_rewards_k1_hand_example():
    # row 0: mask 1 1 1 0, logp - ref = 0.1 -0.2 0.3 5 -> -0.5 * (0.1, -0.2, 0.3) = (-0.05, 0.1, -0.15),
    #        score 2 at the last valid position (t = 2), masked t = 3 gives 0
    # row 1: mask all zero -> no penalty, no score
    # row 2: left padded 0 1 1 1 -> score 3 at t = 3
    diff = t64(0.1, -0.2, 0.3, 5.0)
    logp = torch.stack([diff, diff, diff]) - 1.0
    ref = torch.full((3, 4), -1.0, dtype=f64)
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]])
    scores = t64(2.0, 7.0, 3.0)
    expected = torch.tensor(
        [[-0.05, 0.1, -0.15 + 2.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.1, -0.15, -2.5 + 3.0]], dtype=f64
    )
    for m in (mask, mask.bool(), mask.to(f64)):
        torch.testing.assert_close(L.kl_penalized_rewards(scores, logp, ref, m, kl_coef=0.5), expected)


def test_kl_penalized_rewards_k3_hand_and_precision():
    # d = ref - logp = 0.1: k3 = e^0.1 - 1 - 0.1 = 0.005170918075647624;
    # d = -0.2: e^-0.2 - 1 + 0.2 = 0.01873075307798185
    logp, ref = t64(0.0, 0.0)[None], t64(0.1, -0.2)[None]
    out = L.kl_penalized_rewards(t64(0.0), logp, ref, torch.ones(1, 2), kl_coef=1.0, estimator="k3")
    torch.testing.assert_close(out, -t64(math.exp(0.1) - 1.1, math.exp(-0.2) - 0.8)[None])
    # tiny and moderate d against 50-digit arithmetic; at d = 1e-4, k3 ~ d^2/2 = 5e-9 and the naive
    # exp(d) - 1 - d in float32 is off by ~1e-8 (200%), expm1(d) - d still by ~1e-3 relative.
    import mpmath

    mpmath.mp.dps = 50
    for dtype, rtol in ((torch.float32, 1e-6), (f64, 1e-14)):
        d = torch.tensor([[1e-8, 1e-4, -1e-4, 3e-3, -0.0999, 0.1, 0.5, -3.0]], dtype=dtype)
        exact = torch.tensor([[float(mpmath.expm1(mpmath.mpf(v)) - mpmath.mpf(v)) for v in d[0].tolist()]], dtype=f64)
        zeros = torch.zeros_like(d)
        out = L.kl_penalized_rewards(torch.zeros(1), zeros, d, torch.ones_like(d), kl_coef=1.0, estimator="k3")
        assert out.dtype == dtype
        torch.testing.assert_close(-out.to(f64), exact, rtol=rtol, atol=0)
    with pytest.raises(ValueError, match="estimator"):
        L.kl_penalized_rewards(torch.zeros(1), logp, ref, torch.ones(1, 2), kl_coef=1.0, estimator="k2")


def test_kl_penalized_rewards_extremes_finite():
    # logp = -1e3 vs ref 0: d = 1000 (k3 clamped to e^20 - 21); logp = 0 vs ref -1e3: k3 = e^-1000 - 1 + 1000 = 999
    logp = torch.tensor([[-1e3, 0.0, 7.0]])
    ref = torch.tensor([[0.0, -1e3, float("inf")]])  # inf under the mask must not leak
    mask = torch.tensor([[1, 1, 0]])
    for est in ("k1", "k3"):
        assert_finite(L.kl_penalized_rewards(torch.tensor([100.0]), logp, ref, mask, kl_coef=0.1, estimator=est))
    out = L.kl_penalized_rewards(torch.tensor([0.0]), logp, ref, mask, kl_coef=0.1, estimator="k3")
    assert out[0, 1].item() == pytest.approx(-0.1 * 999.0, rel=1e-6)
    assert out[0, 0].item() == pytest.approx(-0.1 * (math.exp(20) - 21), rel=1e-5)
    assert out[0, 2].item() == 0.0


def _gae_reference(rewards, values, mask, gamma, lam):
    """Textbook GAE, one row at a time on the row's valid positions only (float64)."""
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t]]
        last = 0.0
        for k in reversed(range(len(idx))):
            t = idx[k]
            next_v = values[b, idx[k + 1]].item() if k + 1 < len(idx) else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * mask


def test_gae_hand_example():
    # gamma = lam = 1: A_t = sum of future rewards - V_t = 1 - V_t -> (0.5, 0.4, 0.3); returns all 1
    # lam = 0: A_t = delta_t = (0 + 0.6 - 0.5, 0 + 0.7 - 0.6, 1 + 0 - 0.7) = (0.1, 0.1, 0.3)
    r, v, m = t64(0, 0, 1)[None], t64(0.5, 0.6, 0.7)[None], torch.ones(1, 3)
    adv, ret = L.gae(r, v, m, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, t64(0.5, 0.4, 0.3)[None])
    torch.testing.assert_close(ret, t64(1, 1, 1)[None])
    adv, _ = L.gae(r, v, m, gamma=1.0, lam=0.0)
    torch.testing.assert_close(adv, t64(0.1, 0.1, 0.3)[None])


def test_gae_matches_slow_loop_on_ragged_masks():
    g = torch.Generator().manual_seed(6)
    B, T = 6, 9
    rewards = torch.randn(B, T, dtype=f64, generator=g)
    values = torch.randn(B, T, dtype=f64, generator=g, requires_grad=True)
    lengths = [9, 5, 1, 0, 7, 3]
    mask = torch.tensor([[t < n for t in range(T)] for n in lengths])
    mask[4] = torch.tensor([t >= 2 for t in range(T)])  # left padded
    mask[5] = torch.tensor([1, 1, 0, 0, 1, 0, 1, 0, 0], dtype=torch.bool)  # holes
    for gamma, lam in ((1.0, 0.95), (0.9, 0.8), (0.99, 1.0)):
        adv_ref, ret_ref = _gae_reference(rewards, values.detach(), mask, gamma, lam)
        for m in (mask, mask.float()):
            adv, ret = L.gae(rewards, values, m, gamma=gamma, lam=lam)
            assert not adv.requires_grad and not ret.requires_grad and adv.dtype == f64
            torch.testing.assert_close(adv, adv_ref, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(ret, ret_ref, rtol=1e-12, atol=1e-12)
    # values and rewards past a row's mask have no influence
    rewards2, values2 = rewards.clone(), values.detach().clone()
    rewards2[~mask] = 1e6
    values2[~mask] = -1e6
    torch.testing.assert_close(L.gae(rewards2, values2, mask)[0], L.gae(rewards, values, mask)[0])


def test_ppo_policy_loss_hand_example_and_clipfrac():
    # ratios (1.5, 0.5, 1.1, 0.7), A = (1, 1, -1, -1), eps = 0.2, last position masked:
    # t0: -1.5 vs clipped -1.2 -> max -1.2 (clipped branch, counts in clipfrac)
    # t1: -0.5 vs clipped -0.8 -> max -0.5 (unclipped)
    # t2:  1.1 vs clipped  1.1 -> 1.1 (equal, not counted as clipped)
    # t3: masked (would be clipped: 0.7 vs 0.8)
    # loss = (-1.2 - 0.5 + 1.1) / 3 = -0.2, clipfrac = 1/3
    # d loss / d logp: t0 0 (clipped), t1 -A ratio / 3 = -0.5/3, t2 1.1/3, t3 0
    old = t64(-1.0, -2.0, -3.0, -4.0)[None]
    logp = (old + torch.log(t64(1.5, 0.5, 1.1, 0.7))).requires_grad_()
    adv = t64(1.0, 1.0, -1.0, -1.0)[None]
    mask = torch.tensor([[1, 1, 1, 0]])
    for m in (mask, mask.bool(), mask.to(f64)):
        logp.grad = None
        loss, clipfrac = L.ppo_policy_loss(logp, old, adv, m, clip_eps=0.2)
        loss.backward()
        assert loss.item() == pytest.approx(-0.2, rel=1e-12)
        assert clipfrac.item() == pytest.approx(1 / 3) and not clipfrac.requires_grad
        torch.testing.assert_close(logp.grad, t64(0.0, -0.5 / 3, 1.1 / 3, 0.0)[None])


def test_ppo_policy_loss_gradcheck_and_extremes():
    g = torch.Generator().manual_seed(7)
    old = torch.randn(2, 5, dtype=f64, generator=g)
    logp = (old + 0.05 * torch.randn(2, 5, dtype=f64, generator=g)).requires_grad_()  # inside the clip range
    adv = torch.randn(2, 5, dtype=f64, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    assert gradcheck(lambda x: L.ppo_policy_loss(x, old, adv, mask)[0], (logp,))
    # log ratios of +-1e3, zero advantages and garbage under the mask: no NaN/inf in loss or gradient
    logp = torch.tensor([[0.0, -1e3, 0.0, float("nan")]], requires_grad=True)
    old = torch.tensor([[-1e3, 0.0, -1e3, 0.0]])
    adv = torch.tensor([[0.0, 0.0, -1.0, 5.0]])
    loss, clipfrac = L.ppo_policy_loss(logp, old, adv, torch.tensor([[1, 1, 1, 0]]))
    loss.backward()
    assert_finite(loss, clipfrac, logp.grad)


def test_ppo_value_loss_hand_example():
    # eps = 0.2, old = 0.5 everywhere, so V_clip = clamp(V, 0.3, 0.7):
    # t0: V 1, R 0:   (1)^2 = 1 vs (0.7)^2 = 0.49      -> 1    (unclipped)
    # t1: V 0, R 1:   (1)^2 = 1 vs (0.3 - 1)^2 = 0.49 -> 1    (unclipped)
    # t2: V 1, R 1.5: 0.25 vs (0.7 - 1.5)^2 = 0.64    -> 0.64 (clipped)
    # t3: masked
    # loss = 0.5 * (1 + 1 + 0.64) / 3 = 0.44, clipfrac = 1/3
    values = t64(1.0, 0.0, 1.0, 9.0)[None].requires_grad_()
    old = torch.full((1, 4), 0.5, dtype=f64)
    returns = t64(0.0, 1.0, 1.5, -9.0)[None]
    for m in (torch.tensor([[1, 1, 1, 0]]), torch.tensor([[True, True, True, False]])):
        values.grad = None
        loss, clipfrac = L.ppo_value_loss(values, old, returns, m, clip_eps=0.2)
        loss.backward()
        assert loss.item() == pytest.approx(0.44, rel=1e-12)
        assert clipfrac.item() == pytest.approx(1 / 3) and not clipfrac.requires_grad
        # grad: 0.5/3 * 2 (V - R) on unclipped positions: (1/3, -1/3), 0 where the clipped branch is flat
        torch.testing.assert_close(values.grad, t64(1 / 3, -1 / 3, 0.0, 0.0)[None])


def test_approx_kl_hand_value():
    # d = logp - old = (ln 2, -ln 2): k3 = (2 - 1 - ln 2, 0.5 - 1 + ln 2); mean = 0.5 / 2 = 0.25
    logp, old = t64(math.log(2), -math.log(2), 100.0)[None], torch.zeros(1, 3, dtype=f64)
    assert L.approx_kl(logp, old, torch.tensor([[1, 1, 0]])).item() == pytest.approx(0.25, rel=1e-12)


# ---------------------------------------------------------------------------------------------------
# masked helpers and entropy


def test_masked_mean_var_whiten():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 6, dtype=f64, generator=g)
    mask = torch.rand(3, 6, generator=g) > 0.4
    mask[0, 0] = mask[1, 1] = True
    sel = x[mask]
    for m in (mask, mask.to(f64)):
        assert L.masked_mean(x, m).item() == pytest.approx(sel.mean().item(), rel=1e-12)
        assert L.masked_var(x, m).item() == pytest.approx(sel.var(unbiased=True).item(), rel=1e-12)
        assert L.masked_var(x, m, unbiased=False).item() == pytest.approx(sel.var(unbiased=False).item(), rel=1e-12)
        rows = L.masked_mean(x, m, dim=1)
        torch.testing.assert_close(rows, torch.stack([x[b][mask[b]].mean() for b in range(3)]))
        w = L.masked_whiten(x, m)
        assert w[mask].mean().item() == pytest.approx(0.0, abs=1e-12)
        assert w[mask].var().item() == pytest.approx(1.0, rel=1e-6)
        assert (w[~mask] == 0).all()
        w2 = L.masked_whiten(x, m, shift_mean=False)
        assert w2[mask].mean().item() == pytest.approx(sel.mean().item(), rel=1e-9)


def test_masked_mean_empty_mask_and_nonfinite_under_mask():
    x = torch.tensor([1.0, float("inf"), float("nan")], requires_grad=True)
    assert L.masked_mean(x, torch.tensor([1, 0, 0])).item() == 1.0
    out = L.masked_mean(x, torch.zeros(3))
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="at least 2"):
        L.masked_var(x, torch.tensor([1, 0, 0]))


def test_entropy_from_logits():
    # uniform over V -> ln V; one-hot-ish (one logit +inf far ahead) -> 0; -inf logits ignored:
    # (0, 0, -inf) -> ln 2
    V = 7
    assert L.entropy_from_logits(torch.zeros(V, dtype=f64)).item() == pytest.approx(math.log(V), rel=1e-12)
    assert L.entropy_from_logits(torch.tensor([0.0, 0.0, float("-inf")])).item() == pytest.approx(math.log(2))
    assert L.entropy_from_logits(torch.tensor([1e4, 0.0, 0.0])).item() == pytest.approx(0.0, abs=1e-30)
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 3, 11, generator=g) * 5 + 1e4  # large offset: float32 must not lose the digits
    p64 = torch.softmax(logits.to(f64), -1)
    ref = -(p64 * torch.log(p64)).sum(-1)
    out = L.entropy_from_logits(logits)
    assert out.shape == (2, 3) and out.dtype == torch.float32
    torch.testing.assert_close(out.to(f64), ref, rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 5, dtype=f64, generator=g, requires_grad=True)
    assert gradcheck(L.entropy_from_logits, (x,))


# ---------------------------------------------------------------------------------------------------
# critic-free advantages


def test_group_relative_advantages_as_ppo_uses_them():
    # ppo's grpo estimator: scale "group", eps 1e-6
    # group (1, 2, 3): mean 2, unbiased std 1 -> (-1, 0, 1) / (1 + eps); group (5, 5, 5): 0 / eps = 0
    out = L.group_relative_advantages(t64(1, 2, 3, 5, 5, 5), group_size=3, eps=1e-6)
    torch.testing.assert_close(out, t64(-1, 0, 1, 0, 0, 0) / (1 + 1e-6))
    g = torch.Generator().manual_seed(10)
    s = torch.randn(12, dtype=f64, generator=g)
    ref = torch.cat([(c - c.mean()) / (c.std() + 1e-6) for c in s.split(4)])
    torch.testing.assert_close(L.group_relative_advantages(s, 4, eps=1e-6), ref)
    torch.testing.assert_close(L.group_relative_advantages(s, 1, eps=1e-6), torch.zeros(12, dtype=f64))
    with pytest.raises(ValueError, match="groups of 5"):
        L.group_relative_advantages(s, 5)


def test_leave_one_out_advantages_as_ppo_uses_them():
    # (1, 2, 3): 1 - (2 + 3)/2 = -1.5, 2 - (1 + 3)/2 = 0, 3 - (1 + 2)/2 = 1.5
    torch.testing.assert_close(L.leave_one_out_advantages(t64(1, 2, 3, 0, 0, 6), 3), t64(-1.5, 0, 1.5, -3, -3, 6))
    g = torch.Generator().manual_seed(11)
    s = torch.randn(8, dtype=f64, generator=g)
    # identity: r_i - mean_{j != i} = k/(k-1) (r_i - mean)
    ref = torch.cat([4 / 3 * (c - c.mean()) for c in s.split(4)])
    torch.testing.assert_close(L.leave_one_out_advantages(s, 4), ref)
    with pytest.raises(ValueError, match="group_size"):
        L.leave_one_out_advantages(s, 1)


# ---------------------------------------------------------------------------------------------------
# dtype preservation across the API


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_preserved(dtype):
    g = torch.Generator().manual_seed(12)
    B, T, V = 4, 5, 7
    logits = torch.randn(B, T, V, generator=g).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    vec = lambda: torch.randn(B, generator=g).to(dtype) - 2  # noqa: E731
    mat = lambda: torch.randn(B, T, generator=g).to(dtype) - 2  # noqa: E731
    outs = [
        L.lm_loss(logits, labels),
        L.token_logps(logits, labels),
        L.sequence_logps(logits, labels, mask),
        L.entropy_from_logits(logits),
        L.reward_pair_loss(vec(), vec()),
        *L.dpo_loss(vec(), vec(), vec(), vec()),
        L.simpo_loss(vec(), vec()),
        L.orpo_loss(vec(), vec(), vec()),
        L.kto_loss(vec(), vec(), mask[:, 0], 0.1),
        L.kl_penalized_rewards(vec(), mat(), mat(), mask, kl_coef=0.1, estimator="k3"),
        *L.gae(mat(), mat(), mask),
        *L.ppo_policy_loss(mat(), mat(), mat(), mask),
        *L.ppo_value_loss(mat(), mat(), mat(), mask),
        L.approx_kl(mat(), mat(), mask),
        L.masked_mean(mat(), mask),
        L.masked_var(mat(), mask),
        L.masked_whiten(mat(), mask),
        L.group_relative_advantages(vec(), 2),
        L.leave_one_out_advantages(vec(), 2),
    ]
    for i, out in enumerate(outs):
        assert out.dtype == dtype, (i, out.dtype)
        assert torch.isfinite(out).all(), i


def test_reward_centering_loss_hand_value():
    # pairs (1, -1) and (2, 1): sums 0 and 3, squares 0 and 9, mean 4.5
    chosen, rejected = torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 1.0])
    assert L.reward_centering_loss(chosen, rejected).item() == pytest.approx(4.5)
