"""Contrastive losses and SlimCLR's online distillation against NumPy references."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_wa import slimmable as sl


def _data(seed, *shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(row):
    row = np.asarray(row, np.float64)
    m = row.max()
    return row - m - np.log(np.sum(np.exp(row - m)))


def test_nt_xent_matches_numpy_reference():
    z1, z2, tau = _data(0, 5, 7), _data(1, 5, 7), 0.3
    loss, logits = sl.nt_xent(jnp.asarray(z1), jnp.asarray(z2), temperature=tau)
    z = np.concatenate([_unit(z1), _unit(z2)])
    n2 = z.shape[0]
    total = 0.0
    for i in range(n2):
        positive = (i + 5) % n2
        others = [j for j in range(n2) if j != i]
        denom = np.sum([np.exp(z[i] @ z[j] / tau) for j in others])
        total += -np.log(np.exp(z[i] @ z[positive] / tau) / denom)
    np.testing.assert_allclose(float(loss), total / n2, rtol=1e-5)
    sims = z @ z.T
    off = ~np.eye(n2, dtype=bool)
    np.testing.assert_allclose(np.asarray(logits)[off], sims[off], rtol=1e-5, atol=1e-6)
    assert np.all(np.isneginf(np.diag(np.asarray(logits))))


def test_info_nce_matches_numpy_and_stops_key_gradients():
    q, k, queue, tau = _data(2, 4, 6), _data(3, 4, 6), _data(4, 9, 6), 0.2
    loss, logits = sl.info_nce(jnp.asarray(q), jnp.asarray(k), jnp.asarray(queue), tau)
    qn, kn, nn = _unit(q), _unit(k), _unit(queue)
    want_logits = np.concatenate(
        [np.sum(qn * kn, -1, keepdims=True), qn @ nn.T], axis=1
    )
    want = np.mean([-_log_softmax(row / tau)[0] for row in want_logits])
    np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    gk, gqueue = jax.grad(
        lambda k, n: sl.info_nce(jnp.asarray(q), k, n, tau)[0], (0, 1)
    )(jnp.asarray(k), jnp.asarray(queue))
    np.testing.assert_array_equal(gk, 0.0)
    np.testing.assert_array_equal(gqueue, 0.0)


def test_mocov3_loss_matches_numpy_reference():
    q1, q2, k1, k2 = (_data(s, 4, 5) for s in (5, 6, 7, 8))
    tau = 0.5
    loss, (l12, _) = sl.mocov3_loss(*(jnp.asarray(a) for a in (q1, q2, k1, k2)), tau)

    def ctr(q, k):
        sims = _unit(q) @ _unit(k).T
        return (
            2 * tau * np.mean([-_log_softmax(sims[i] / tau)[i] for i in range(len(q))])
        )

    np.testing.assert_allclose(float(loss), ctr(q1, k2) + ctr(q2, k1), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(l12), _unit(q1) @ _unit(k2).T, rtol=1e-5, atol=1e-6
    )


def test_distillation_matches_temperature_scaled_kl():
    s, t, temp = _data(9, 3, 6), _data(10, 3, 6), 5.0
    got = sl.contrastive_distillation(jnp.asarray(s), jnp.asarray(t), temp)
    want = 0.0
    for srow, trow in zip(s, t):
        log_p, log_q = _log_softmax(trow / temp), _log_softmax(srow / temp)
        want += np.sum(np.exp(log_p) * (log_p - log_q))
    np.testing.assert_allclose(float(got), temp**2 * want / 3, rtol=1e-4)


def test_distillation_has_the_gradient_of_the_soft_cross_entropy():
    """KL and the paper's soft CE differ by the teacher entropy: same student gradient."""
    s, t, temp = jnp.asarray(_data(11, 4, 5)), jnp.asarray(_data(12, 4, 5)), 5.0

    def soft_ce(s):
        p = jax.nn.softmax(t / temp)
        return temp**2 * jnp.mean(-jnp.sum(p * jax.nn.log_softmax(s / temp), axis=-1))

    chex.assert_trees_all_close(
        jax.grad(sl.contrastive_distillation)(s, t, temp),
        jax.grad(soft_ce)(s),
        atol=1e-6,
    )


def test_distillation_is_zero_with_zero_gradient_when_student_equals_teacher():
    z = jnp.asarray(_data(13, 4, 3))
    _, logits = sl.nt_xent(z, z + 0.5)  # -inf on the diagonal
    value, grad = jax.value_and_grad(sl.contrastive_distillation)(logits, logits)
    assert float(value) == 0.0
    np.testing.assert_array_equal(grad, 0.0)


def test_distillation_sends_no_gradient_to_the_teacher():
    s, t = jnp.asarray(_data(14, 3, 4)), jnp.asarray(_data(15, 3, 4))
    g_teacher = jax.grad(sl.contrastive_distillation, argnums=1)(s, t)
    np.testing.assert_array_equal(g_teacher, 0.0)
    assert np.any(np.asarray(jax.grad(sl.contrastive_distillation)(s, t)) != 0)


def test_distillation_masks_infinite_entries_without_nan():
    s = jnp.asarray(_data(16, 3, 4))
    t = jnp.asarray(_data(17, 3, 4))
    mask = np.array([[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 1, 1]], bool)
    s_masked = jnp.where(mask, s, -jnp.inf)
    t_masked = jnp.where(mask, t, -jnp.inf)
    value, grad = jax.value_and_grad(sl.contrastive_distillation)(s_masked, t_masked)
    chex.assert_tree_all_finite((value, grad))
    np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)
    # Equals the KL over the valid entries of each row; the empty row adds 0.
    want = 0.0
    for i in (0, 2):
        cols = mask[i]
        log_p = _log_softmax(np.asarray(t)[i, cols] / 5.0)
        log_q = _log_softmax(np.asarray(s)[i, cols] / 5.0)
        want += np.sum(np.exp(log_p) * (log_p - log_q))
    np.testing.assert_allclose(float(value), 25.0 * want / 3, rtol=1e-4)


_LOSSES = {
    "nt_xent": lambda x, t: sl.nt_xent(x, x, temperature=t)[0],
    "info_nce": lambda x, t: sl.info_nce(x, x, x, temperature=t)[0],
    "mocov3": lambda x, t: sl.mocov3_loss(x, x, x, x, temperature=t)[0],
    "distillation": lambda x, t: sl.contrastive_distillation(x, x, temperature=t),
}


@pytest.mark.parametrize("name", sorted(_LOSSES))
@pytest.mark.parametrize(
    "temperature",
    [0.0, -1.0, np.float32(0.0), np.float64(-0.5), jnp.float32(0.0), float("nan")],
    ids=["zero", "negative", "np_float32_zero", "np_float64", "jax_zero", "nan"],
)
def test_losses_reject_non_positive_temperature(name, temperature):
    with pytest.raises(ValueError, match="temperature"):
        _LOSSES[name](jnp.ones((2, 3)), temperature)


@pytest.mark.parametrize("name", sorted(_LOSSES))
def test_losses_reject_non_scalar_temperature(name):
    with pytest.raises(TypeError, match="temperature"):
        _LOSSES[name](jnp.ones((2, 3)), np.array([0.5, 0.5]))


@pytest.mark.parametrize("name", sorted(_LOSSES))
def test_traced_non_positive_temperature_gives_nan_not_a_finite_loss(name):
    """Under jit the temperature is not known when the loss is built: NaN, documented."""
    x = jnp.asarray(_data(20, 4, 3))
    fn = jax.jit(_LOSSES[name])
    assert np.isnan(float(fn(x, jnp.float32(0.0))))
    assert np.isnan(float(fn(x, jnp.float32(-1.0))))
    # A positive traced temperature gives the eager value.
    np.testing.assert_allclose(
        float(fn(x, jnp.float32(0.3))), float(_LOSSES[name](x, 0.3)), rtol=1e-6
    )


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda a, b: sl.mocov3_loss(a, a, b, b), "mocov3_loss"),
        (lambda a, b: sl.mocov3_loss(a, b, a, a), "mocov3_loss"),
        (lambda a, b: sl.nt_xent(a, b), "nt_xent"),
        (lambda a, b: sl.info_nce(a, b, a), "info_nce"),
        (lambda a, b: sl.info_nce(a, a, jnp.ones((5, 4))), "queue"),
    ],
    ids=["mocov3_keys", "mocov3_queries", "nt_xent", "info_nce_key", "info_nce_queue"],
)
def test_losses_reject_mismatched_batch_or_feature_sizes(call, match):
    """Mismatched batches used to broadcast into a NaN or a wrong loss."""
    with pytest.raises(ValueError, match=match):
        call(jnp.ones((4, 3)), jnp.ones((6, 3)))


def test_distillation_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="equal shapes"):
        sl.contrastive_distillation(jnp.ones((2, 3)), jnp.ones((2, 4)))


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_distillation_propagates_nan_logits(which):
    """A NaN logit is not a mask: value and student gradient are NaN, not 0."""
    s, t = _data(21, 3, 4), _data(22, 3, 4)
    (s if which == "student" else t)[1, 2] = np.nan
    value, grad = jax.value_and_grad(sl.contrastive_distillation)(
        jnp.asarray(s), jnp.asarray(t)
    )
    assert np.isnan(float(value))
    assert np.all(np.isnan(np.asarray(grad)[1]))


def test_l2_normalize_matches_torch_rule_at_zero_tiny_and_huge():
    """``x / max(||x||, eps)`` (PyTorch's normalize) with its Jacobian, float32 range edges."""
    eps = 1e-12
    x = np.array(
        [[3.0, -4.0], [0.0, 0.0], [1e-13, 2e-13], [1e20, -1e20], [3e-30, 4e-30]]
    )
    got = np.asarray(sl.l2_normalize(jnp.asarray(x, jnp.float32)))
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    want = x / np.maximum(norm, eps)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    # Jacobian of a row: I / max(n, eps) below eps; (I - u u^T) / n above.
    for row in x:
        jac = np.asarray(jax.jacobian(sl.l2_normalize)(jnp.asarray(row, jnp.float32)))
        n = np.linalg.norm(row)
        if n < eps:
            want_jac = np.eye(2) / eps
        else:
            u = row / n
            want_jac = (np.eye(2) - np.outer(u, u)) / n
        np.testing.assert_allclose(
            jac, want_jac, rtol=1e-5, atol=1e-6 * np.abs(want_jac).max()
        )


@pytest.mark.parametrize("temperature", [2.0, 5.0, 10.0])
def test_distillation_of_cosine_logits_is_half_the_variance_of_the_difference(
    temperature,
):
    """Why SlimCLR's KD terms are small: with cosine logits and T >= 2, T^2 KL ~ Var/2.

    Both softmaxes are nearly uniform, and the second-order expansion of the KL
    gives ``0.5 * mean_i Var_j(s_ij - t_ij)``, independent of T: a weak
    squared error between similarity rows (0.036 here, for row differences of
    standard deviation 0.27), not a temperature-sharpened match.
    """
    rng = np.random.default_rng(0)
    t = np.tanh(rng.normal(size=(64, 64)))
    s = np.clip(t + 0.3 * rng.normal(size=t.shape), -1, 1)
    got = float(
        sl.contrastive_distillation(
            jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), temperature
        )
    )
    closed = 0.5 * np.mean(np.var(s - t, axis=1))
    np.testing.assert_allclose(got, closed, rtol=0.02)
    # The exact KL (float64) for comparison: the expansion is its limit.
    exact = 0.0
    for srow, trow in zip(s, t):
        log_p, log_q = (
            _log_softmax(trow / temperature),
            _log_softmax(srow / temperature),
        )
        exact += np.sum(np.exp(log_p) * (log_p - log_q))
    np.testing.assert_allclose(got, temperature**2 * exact / 64, rtol=5e-4)
