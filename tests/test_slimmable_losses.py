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


@pytest.mark.parametrize(
    "call",
    [
        lambda x: sl.nt_xent(x, x, temperature=0.0),
        lambda x: sl.info_nce(x, x, x, temperature=-1.0),
        lambda x: sl.mocov3_loss(x, x, x, x, temperature=0.0),
        lambda x: sl.contrastive_distillation(x, x, temperature=0.0),
    ],
    ids=["nt_xent", "info_nce", "mocov3", "distillation"],
)
def test_losses_reject_non_positive_temperature(call):
    with pytest.raises(ValueError, match="temperature"):
        call(jnp.ones((2, 3)))


def test_distillation_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="equal shapes"):
        sl.contrastive_distillation(jnp.ones((2, 3)), jnp.ones((2, 4)))


def test_l2_normalize_is_finite_at_zero():
    value, grad = jax.value_and_grad(lambda x: jnp.sum(sl.l2_normalize(x)))(
        jnp.zeros((2, 3))
    )
    chex.assert_tree_all_finite((value, grad))
