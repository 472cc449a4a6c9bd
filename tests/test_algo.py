"""The AAPO math against hand-computed values, closed-form gradients and split invariance."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aapo_ray import algo
from aapo_ray.algo import (LOSS_AGGS, aapo_advantages, aapo_loss, advantage_diagnostics, dr_grpo_advantages,
                           get_estimator, gpg_advantages, gpg_alpha, gpg_fill, grpo_advantages, grpo_loss,
                           loss_weights, token_logprobs)

T = torch.tensor


def close(a, b, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32),
                               torch.as_tensor(b, dtype=torch.float32), atol=tol, rtol=tol)


# ---------------------------------------------------------------- hand-computed advantages
def test_mixed_group_scaled_by_bessel_std():
    r, ref = T([1.0, 0.0, 0.0, 1.0]), T([1.0, 1.0, 0.0, 0.0])
    std = math.sqrt(1 / 3)  # Bessel-corrected std of [1, 0, 0, 1]
    group = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4)]
    margin = [0.0, -0.2, 0.0, 0.28]  # r - ref = [0, -1, 0, 1] clipped to [-0.2, 0.28]
    close(aapo_advantages(r, ref, 4), [g + m for g, m in zip(group, margin)])
    close(grpo_advantages(r, 4), group)


def test_scale_off_is_plain_centering():
    r, ref = T([1.0, 0.0, 0.0, 0.0]), T([0.0, 0.0, 0.0, 0.0])
    close(aapo_advantages(r, ref, 4, scale_rewards=False), [0.75 + 0.28, -0.25, -0.25, -0.25])
    close(dr_grpo_advantages(r, 4), [0.75, -0.25, -0.25, -0.25])


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_all_equal_group_gets_clipped_margin_and_grpo_gets_zero(value):
    r = T([value] * 3)
    ref = T([1.0, 0.0, value])  # reference did better, worse, same
    expected = [max(value - 1.0, -0.2), min(value - 0.0, 0.28), 0.0]
    close(aapo_advantages(r, ref, 3), expected)
    close(grpo_advantages(r, 3), [0.0, 0.0, 0.0])


def test_margin_no_clip_and_both_bounds():
    r, ref = T([2.0, 2.0, 2.0, -1.0]), T([0.0, 1.9, 2.1, 2.0])
    # all-equal first group would need G=3; use G=4 with scale off to read the margin directly
    group = (r - r.mean()).tolist()
    close(aapo_advantages(r, ref, 4, scale_rewards=False, margin_clip=None),
          [g + m for g, m in zip(group, [2.0, 0.1, -0.1, -3.0])])
    close(aapo_advantages(r, ref, 4, scale_rewards=False, margin_clip=(0.05, 0.5)),
          [g + m for g, m in zip(group, [0.5, 0.1, -0.05, -0.05])])


def test_use_margin_false_equals_group_part():
    r = T([0.3, 0.1, 0.9, 0.9, 0.2, 0.4])
    close(aapo_advantages(r, None, 3, use_margin=False), grpo_advantages(r, 3))


def test_nan_rewards_count_as_zero_and_are_reported():
    r, ref = T([1.0, float("nan"), 0.0, 1.0]), T([0.0, 0.0, float("inf"), 1.0])
    adv = aapo_advantages(r, ref, 2, scale_rewards=False)
    assert torch.isfinite(adv).all()
    close(adv, aapo_advantages(T([1.0, 0.0, 0.0, 1.0]), T([0.0, 0.0, 0.0, 1.0]), 2, scale_rewards=False))
    stats = advantage_diagnostics(r, ref, adv, 2)
    assert stats["nonfinite_rewards"] == 1.0 and stats["nonfinite_ref_rewards"] == 1.0


@pytest.mark.parametrize("bad, match", [
    (T([1.0, 0.0, 1.0]), "not a positive multiple of group_size=2"),
    (T([[1.0, 0.0]]), "1-D"),
    (T([]), "not a positive multiple"),
])
def test_bad_shapes_raise_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        grpo_advantages(bad, 2)


def test_other_errors():
    with pytest.raises(ValueError, match="group_size >= 2"):
        grpo_advantages(T([1.0, 0.0]), 1)
    with pytest.raises(ValueError, match="pairs the i-th"):
        aapo_advantages(T([1.0, 0.0]), T([1.0, 0.0, 0.0, 0.0]), 2)
    with pytest.raises(ValueError, match="needs ref_rewards"):
        aapo_advantages(T([1.0, 0.0]), None, 2)
    with pytest.raises(ValueError, match="unknown estimator 'ppo'"):
        get_estimator("ppo")
    assert grpo_advantages(T([1.0, 0.0]), 1, scale_rewards=False).abs().sum() == 0


def test_diagnostics_hand_computed():
    r = T([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])       # groups: [1,1], [0,1], [0,0]
    ref = T([0.0, 1.0, 1.0, 1.0, 0.0, -1.0])    # raw margins: 1, 0, -1, 0, 0, 1
    adv = aapo_advantages(r, ref, 2)
    s = advantage_diagnostics(r, ref, adv, 2)
    assert s["zero_variance_group_frac"] == pytest.approx(2 / 3)
    assert s["zero_advantage_frac"] == pytest.approx(2 / 6)  # samples 2 and 5 of equal groups, zero margin
    assert s["margin_mean"] == pytest.approx((0.28 + 0 - 0.2 + 0 + 0 + 0.28) / 6)
    assert s["margin_clipped_high_frac"] == pytest.approx(2 / 6)
    assert s["margin_clipped_low_frac"] == pytest.approx(1 / 6)
    assert all(isinstance(v, float) for v in s.values())


def test_registry():
    from typing import get_args

    from aapo_ray.config import ESTIMATOR_DEFAULTS, AlgoConfig

    names = {"aapo", "aapo_no_margin", "gpg", "grpo", "dr_grpo"}
    assert set(algo.ESTIMATORS) == set(ESTIMATOR_DEFAULTS) == set(get_args(AlgoConfig.model_fields["estimator"].annotation)) == names
    assert set(LOSS_AGGS) == set(get_args(get_args(AlgoConfig.model_fields["loss_agg"].annotation)[0]))
    assert get_estimator("aapo").needs_reference and not get_estimator("gpg").needs_reference
    assert not get_estimator("aapo_no_margin").needs_reference
    r, ref = T([1.0, 1.0, 0.0, 1.0]), T([0.0, 1.0, 1.0, 1.0])
    # aapo_no_margin is what "gpg" used to be: GPG's ablation row F_norm = std, alpha = 1 (= grpo's advantage)
    close(get_estimator("aapo_no_margin").advantages(r, ref, 2), grpo_advantages(r, 2))
    close(get_estimator("gpg").advantages(r, ref, 2), [0.0, 0.0, -1.0, 1.0])  # alpha = 4/2, F_norm = 1
    assert get_estimator("gpg").loss is aapo_loss
    close(get_estimator("aapo").advantages(r, ref, 2), aapo_advantages(r, ref, 2))
    close(get_estimator("dr_grpo").advantages(r, ref, 2), dr_grpo_advantages(r, 2))
    assert get_estimator("dr_grpo").loss_denominator(7, 4, 16) == 64.0
    assert get_estimator("aapo").loss_denominator(7, 4, 16) == 7.0


# ---------------------------------------------------------------- losses and gradients
def _case(seed=0, batch=3, length=5, vocab=7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=g)
    tokens = torch.randint(vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    adv = torch.randn(batch, generator=g)
    return logits, tokens, mask, adv


def test_loss_gradient_matches_closed_form():
    logits, tokens, mask, adv = _case()
    logits.requires_grad_(True)
    loss = aapo_loss(token_logprobs(logits, tokens), mask, adv)
    loss.backward()
    onehot = torch.nn.functional.one_hot(tokens, logits.shape[-1]).float()
    expected = -adv[:, None, None] * (onehot - logits.detach().softmax(-1)) * mask[..., None] / mask.sum()
    close(logits.grad, expected, tol=1e-6)


def test_temperature_scales_logits():
    logits, tokens, _, _ = _case()
    close(token_logprobs(logits, tokens, 0.5), torch.log_softmax(logits / 0.5, -1).gather(-1, tokens[..., None])[..., 0])


def test_grpo_on_policy_gradient_equals_aapo_loss_and_kl_is_zero_at_reference():
    logits, tokens, mask, adv = _case(seed=1)
    grads = []
    for fn in (lambda lp: aapo_loss(lp, mask, adv),
               lambda lp: grpo_loss(lp, mask, adv, ref_logprobs=lp.detach(), kl_beta=0.5)):
        x = logits.clone().requires_grad_(True)
        fn(token_logprobs(x, tokens)).backward()
        grads.append(x.grad)
    close(grads[0], grads[1], tol=1e-6)


def test_grpo_clip_blocks_gradient_outside_trust_region():
    lp = torch.zeros(1, 2, requires_grad=True)
    old = T([[-1.0, 0.0]])  # token 0 ratio e > 1.2 with positive advantage: clipped, no gradient
    grpo_loss(lp, torch.ones(1, 2), T([1.0]), old_logprobs=old).backward()
    assert lp.grad[0, 0] == 0 and lp.grad[0, 1] != 0


@pytest.mark.parametrize("estimator", ["aapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("pieces", [2, 4])
def test_split_invariance(estimator, pieces):
    est = get_estimator(estimator)
    logits, tokens, mask, adv = _case(seed=2, batch=8, length=6)
    denom = est.loss_denominator(int(mask.sum()), 8, 6)

    def grad(parts):
        x = logits.clone().requires_grad_(True)
        for idx in parts:
            est.loss(token_logprobs(x[idx], tokens[idx]), mask[idx], adv[idx], num_tokens=denom).backward()
        return x.grad

    full = grad([torch.arange(8)])
    split = grad(torch.arange(8).chunk(pieces))
    close(full, split, tol=1e-6)
    # the naive per-micro-batch token mean is NOT split invariant: check the test could fail
    x = logits.clone().requires_grad_(True)
    for idx in torch.arange(8).chunk(pieces):
        aapo_loss(token_logprobs(x[idx], tokens[idx]), mask[idx], adv[idx]).backward()
    assert not torch.allclose(x.grad * pieces, full, atol=1e-6)


# ---------------------------------------------------------------- properties
rewards_st = st.floats(-2.0, 2.0, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.integers(1, 8), st.data(),
       st.sampled_from([(0.2, 0.28), (0.0, 0.5), None]), st.booleans())
def test_properties(num_prompts, group_size, data, clip, scale):
    scale = scale and group_size > 1
    n = num_prompts * group_size
    r = T(data.draw(st.lists(rewards_st, min_size=n, max_size=n)))
    ref = T(data.draw(st.lists(rewards_st, min_size=n, max_size=n)))
    equal = data.draw(st.integers(0, num_prompts - 1))
    r[equal * group_size:(equal + 1) * group_size] = r[equal * group_size]  # force one all-equal group
    adv = aapo_advantages(r, ref, group_size, scale_rewards=scale, margin_clip=clip)
    assert adv.shape == (n,) and torch.isfinite(adv).all()
    margin = algo.advantage_margin(r, ref, group_size, clip)
    group = slice(equal * group_size, (equal + 1) * group_size)
    close(adv[group], margin[group], tol=1e-5)
    if clip is not None:
        assert (margin >= -clip[0] - 1e-6).all() and (margin <= clip[1] + 1e-6).all()
    s = advantage_diagnostics(r, ref, adv, group_size, clip)
    assert 1 / num_prompts - 1e-6 <= s["zero_variance_group_frac"] <= 1.0
    assert all(math.isfinite(v) for v in s.values())


def test_all_equal_group_is_exactly_zero_despite_float_rounding():
    r = torch.full((8,), 0.14417848)  # its float32 mean is not exactly itself
    assert (grpo_advantages(r, 8) == 0).all()
    close(aapo_advantages(r, torch.zeros(8), 8), torch.full((8,), 0.14417848))


# ---------------------------------------------------------------- GPG (arXiv 2504.02546)
def test_gpg_alpha_and_advantages_hand_computed():
    r = T([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0])  # groups [1,1] [0,1] [0,0] [1,0]: B = 8, M = 4
    assert gpg_alpha(r, 2) == 2.0
    close(gpg_advantages(r, 2), [0, 0, -1.0, 1.0, 0, 0, 1.0, -1.0])  # 2 * (r - mean), no std
    s = 2 * 0.5 / (math.sqrt(0.5) + 1e-4)  # F_norm = std ablation: Bessel std of [0, 1] is sqrt(1/2)
    close(gpg_advantages(r, 2, scale_rewards=True), [0, 0, -s, s, 0, 0, s, -s])
    # G = 3: one valid group of 3 among 9 samples -> alpha = 9 / 3; verl would use 9 / 5 non-zero rewards
    r3 = T([1.0, 1.0, 1.0, 2.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    assert gpg_alpha(r3, 3) == 3.0
    close(gpg_advantages(r3, 3), [0, 0, 0, 3.0, -3.0, 0, 0, 0, 0])
    assert gpg_alpha(T([1.0, 1.0, 0.0, 0.0]), 2) == 1.0  # nothing valid: alpha 1, advantages all 0
    assert (gpg_advantages(T([1.0, 1.0, 0.0, 0.0]), 2) == 0).all()


def test_gpg_fill_tops_up_to_threshold_hand_computed():
    first = T([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])  # valid: F T F -> share 1/3
    order, share = gpg_fill(first, 2, 3)
    assert order.tolist() == [0, 1, 2] and share == pytest.approx(1 / 3)  # below beta_th = 0.6: top up
    both = torch.cat([first, T([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])])  # second round valid: T F T
    order, share = gpg_fill(both, 2, 3)
    assert order.tolist() == [1, 3, 5] and share == 1.0  # valid groups first, in arrival order
    order, share = gpg_fill(torch.cat([first, T([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])]), 2, 3)
    assert order.tolist() == [0, 1, 3] and share == pytest.approx(2 / 3)  # filled with a zero-variance group
    picked = torch.cat([first, T([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])]).view(-1, 2)[order].flatten()
    assert gpg_alpha(picked, 2) == pytest.approx(6 / 4)  # alpha of the batch trained on: B / (B - M)
    order, share = gpg_fill(T([0.0, 1.0, 1.0, 0.0, 0.0, 0.0]), 2, 3)
    assert order.tolist() == [0, 1, 2] and share == pytest.approx(2 / 3)  # enough valid: identity


# ---------------------------------------------------------------- loss aggregation
def test_loss_weights_hand_computed():
    lengths = [2, 4, 1, 3]  # two groups of 2: 6 and 4 tokens
    assert loss_weights("token_mean", lengths, 2, 8) == (None, 10.0)
    assert loss_weights("seq_mean_token_sum_norm", lengths, 2, 8) == (None, 32.0)
    w, d = loss_weights("seq_mean_token_mean", lengths, 2, 8)
    close(w, [1 / 2, 1 / 4, 1, 1 / 3])
    assert d == 4.0
    w, d = loss_weights("group_token_mean", lengths, 2, 8)
    close(w, [1 / 6, 1 / 6, 1 / 4, 1 / 4])
    assert d == 2.0
    with pytest.raises(ValueError, match="unknown loss_agg"):
        loss_weights("sum", lengths, 2, 8)


def _agg_case():
    g = torch.Generator().manual_seed(7)
    lengths, width = [2, 4, 1, 3], 4
    mask = (torch.arange(width)[None, :] < T(lengths)[:, None]).float()
    return lengths, torch.randn(4, width, generator=g), torch.randn(4, width, generator=g), mask, T([0.5, -1.0, 2.0, 0.25])


@pytest.mark.parametrize("agg", LOSS_AGGS)
def test_every_loss_agg_matches_hand_computation(agg):
    lengths, lp, ref_lp, mask, adv = _agg_case()
    G, max_len, beta = 2, 8, 0.3

    def hand(term):  # term(i, t): the per-token loss; explicit loops over the formula of each aggregation
        seq_sum = [sum(term(i, t) for t in range(lengths[i])) for i in range(4)]
        if agg == "token_mean":
            return sum(seq_sum) / sum(lengths)
        if agg == "seq_mean_token_mean":
            return sum(s / n for s, n in zip(seq_sum, lengths)) / 4
        if agg == "group_token_mean":
            return sum((seq_sum[2 * g] + seq_sum[2 * g + 1]) / (lengths[2 * g] + lengths[2 * g + 1]) for g in range(2)) / 2
        return sum(seq_sum) / (4 * max_len)

    w, d = loss_weights(agg, lengths, G, max_len)
    nll = hand(lambda i, t: -adv[i].item() * lp[i, t].item())
    assert aapo_loss(lp, mask, adv, num_tokens=d, weights=w).item() == pytest.approx(nll, rel=1e-5)
    k3 = lambda i, t: math.exp(ref_lp[i, t] - lp[i, t]) - (ref_lp[i, t] - lp[i, t]).item() - 1  # noqa: E731
    surrogate = hand(lambda i, t: -adv[i].item() + beta * k3(i, t))  # on-policy: ratio 1
    got = grpo_loss(lp, mask, adv, ref_logprobs=ref_lp, kl_beta=beta, num_tokens=d, weights=w)
    assert got.item() == pytest.approx(surrogate, rel=1e-5)


def test_token_mean_path_is_bitwise_the_old_formula():
    """The default aapo run must not change: no weights -> exactly -sum(A * logp * M) / N as before."""
    lengths, lp, _, mask, adv = _agg_case()
    w, d = loss_weights("token_mean", lengths, 2, 8)
    assert w is None and torch.equal(aapo_loss(lp, mask, adv, num_tokens=d), -(adv[:, None] * lp * mask).sum() / 10.0)


@pytest.mark.parametrize("agg", LOSS_AGGS)
@pytest.mark.parametrize("loss", ["aapo", "grpo_kl"])
def test_split_invariance_every_loss_agg(agg, loss):
    """1 vs 2 vs 4 micro-batches give the same gradient; also equals the loss on the whole batch."""
    logits, tokens, mask, adv = _case(seed=3, batch=8, length=6)
    ref = torch.randn(logits.shape, generator=torch.Generator().manual_seed(9))
    lengths = mask.sum(1).tolist()
    w, d = loss_weights(agg, lengths, 2, 6)

    def grad(parts):
        x = logits.clone().requires_grad_(True)
        for idx in parts:
            kw = {} if w is None else {"weights": w[idx]}
            lp = token_logprobs(x[idx], tokens[idx])
            if loss == "aapo":
                aapo_loss(lp, mask[idx], adv[idx], num_tokens=d, **kw).backward()
            else:
                grpo_loss(lp, mask[idx], adv[idx], ref_logprobs=token_logprobs(ref[idx], tokens[idx]), kl_beta=0.2,
                          num_tokens=d, **kw).backward()
        return x.grad

    full = grad([torch.arange(8)])
    for pieces in (2, 3, 4):  # 3 pieces (3 + 3 + 2 rows) cut groups in half
        close(grad(torch.arange(8).chunk(pieces)), full, tol=1e-6)
