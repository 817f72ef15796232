"""Scaled, safe norms and ratios (``optax_wa._numerics``) and their users.

References: float64 NumPy evaluations of the same formula on the same
(rounded) inputs; the derivative of the norm, x / ||x||, and 0 at x = 0.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_wa import slimmable as sl
from optax_wa._numerics import (
    global_norm,
    ratio_to_norm,
    safe_ratio,
    weighted_norm_factors,
)

_BASE = [np.array([[1.5, -0.25], [3.0, 0.5]]), np.array([-2.0, 0.75, 1.0])]


def _as64(x):
    return np.asarray(np.asarray(x, np.float32), np.float64)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1.0, 1e19, 1e30])
def test_global_norm_matches_float64_at_every_scale(scale, dtype):
    leaves = [jnp.asarray(scale * x, dtype) for x in _BASE]
    expected = np.sqrt(sum(np.sum(_as64(x) ** 2) for x in leaves))
    got = jax.jit(global_norm)(leaves)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # The plain float32 form fails at both ends (inf, or 0 / a denormal).
    plain = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
    if scale >= 1e19:
        assert np.isinf(plain)
    if scale <= 1e-20:
        assert not np.isclose(plain, expected, rtol=1e-3, atol=0.0)


@pytest.mark.parametrize("scale", [1e-20, 1.0, 1e19])
def test_global_norm_gradient_is_x_over_norm(scale):
    leaves = [jnp.asarray(scale * x, jnp.float32) for x in _BASE]
    grads = jax.jit(jax.grad(global_norm))(leaves)
    norm = np.sqrt(sum(np.sum(_as64(x) ** 2) for x in leaves))
    for g, x in zip(grads, leaves):
        np.testing.assert_allclose(g, _as64(x) / norm, rtol=1e-6)


def test_global_norm_at_zero_and_of_inf():
    zeros = [jnp.zeros((2, 2)), jnp.zeros(3)]
    assert float(global_norm(zeros)) == 0.0
    grads = jax.grad(global_norm)(zeros)
    chex.assert_trees_all_equal(grads, zeros)  # finite: 0, not NaN
    assert float(global_norm([])) == 0.0
    assert float(global_norm([jnp.array([1.0, jnp.inf])])) == np.inf


@pytest.mark.parametrize("scale", [1e-20, 1e19])
def test_safe_ratio_derivative_survives_extreme_denominators(scale):
    # d/dd (n / d) = -n / d^2: a plain division forms d^2 (1e38 overflows
    # float32 beyond 1.8e19; 1e-40 underflows), the scaled one does not.
    n, d = 0.5 * scale, 2.0 * scale
    value, (dn, dd) = jax.value_and_grad(safe_ratio, argnums=(0, 1))(
        jnp.float32(n), jnp.float32(d)
    )
    np.testing.assert_allclose(value, 0.25, rtol=1e-6)
    np.testing.assert_allclose(dn, 1.0 / d, rtol=1e-6)
    np.testing.assert_allclose(dd, -n / d**2, rtol=1e-6)
    zero = jax.grad(safe_ratio, argnums=(0, 1))(jnp.float32(1.0), jnp.float32(0.0))
    assert safe_ratio(1.0, 0.0) == 0.0 and all(np.isfinite(z) for z in zero)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("scale", [1e-20, 1e19, 1e30])
def test_slimmable_grad_stats_ratio_at_extreme_scales(scale, dtype):
    # min_width 0.5 on a 4-vector: the first 2 entries are the shared block.
    g = np.array([3.0, -4.0, 0.5, 12.0])
    stats = sl.slimmable_grad_stats({"w": sl.SlicedAxes((0,))}, min_width=0.5)
    grads = {"w": jnp.asarray(scale * g, dtype)}
    _, state = jax.jit(stats.update)(grads, stats.init({"w": jnp.zeros(4)}))
    rounded = _as64(grads["w"])
    expected = np.linalg.norm(rounded[2:]) / np.linalg.norm(rounded[:2])
    np.testing.assert_allclose(state.mean_ratio, expected, rtol=1e-6)
    # jax.grad of the recorded ratio with respect to the gradient is finite.
    ratio = lambda x: stats.update({"w": x}, stats.init({"w": x}))[1].mean_ratio
    chex.assert_tree_all_finite(jax.grad(ratio)(grads["w"].astype(jnp.float32)))
    chex.assert_tree_all_finite(jax.grad(ratio)(jnp.zeros(4)))


_T = [np.array([[0.5, 2.0], [1.0, 0.25]]), None]


@pytest.mark.parametrize(
    "t_scale, x_scale", [(1.0, 1.0), (1e20, 1e20), (1e-20, 1e-20), (1e30, 1e-25)]
)
def test_weighted_norm_factors_match_float64(t_scale, x_scale):
    # The products t * x (up to 1e40 or 1e-40) leave float32's range; their
    # norm's factors do not, and their product is the float64 norm (or inf
    # where that norm itself is beyond float32).
    x = [jnp.asarray(x_scale * b, jnp.float32) for b in _BASE]
    t = [None if w is None else jnp.asarray(t_scale * w, jnp.float32) for w in _T]
    factors = jax.jit(weighted_norm_factors)(x, t)
    ones = [np.ones_like(b) if w is None else _as64(w) for b, w in zip(_BASE, t)]
    expected = np.sqrt(sum(np.sum((w * _as64(v)) ** 2) for w, v in zip(ones, x)))
    product = np.prod([np.float64(f) for f in factors])
    np.testing.assert_allclose(product, expected, rtol=1e-6)
    value = factors.value()
    if expected > np.finfo(np.float32).max:
        assert np.isinf(value)
    elif expected > np.finfo(np.float32).tiny:
        np.testing.assert_allclose(value, expected, rtol=1e-6)
    # A ratio to the norm is finite and right wherever it fits float32.
    num = jnp.float32(3.0)
    ratio = jax.jit(ratio_to_norm)(num, factors, 1e-12)
    assert np.isfinite(ratio)
    want = 3.0 / (expected + 1e-12)
    if want > np.finfo(np.float32).tiny:
        np.testing.assert_allclose(ratio, want, rtol=1e-6)


def test_weighted_norm_factors_without_weights_equal_global_norm():
    x = [jnp.asarray(1e19 * b, jnp.float32) for b in _BASE]
    factors = weighted_norm_factors(x, [None, None])
    assert factors.value() == global_norm(x)  # bitwise: the same arithmetic


@pytest.mark.parametrize("scale", [0.0, 1.0, 1e20])
def test_ratio_to_norm_gradient_is_finite(scale):
    # At 0 (denominator eps), at 1, and where the norm overflows float32.
    t = jnp.asarray(scale * np.array([1.0, 2.0, 0.5]), jnp.float32)

    def f(x, n):
        return ratio_to_norm(n, weighted_norm_factors([x], [t]), 1e-12)

    x = jnp.asarray(scale * np.array([0.5, -1.0, 3.0]), jnp.float32)
    grads = jax.jit(jax.grad(f, argnums=(0, 1)))(x, jnp.float32(2.0))
    chex.assert_tree_all_finite(grads)
    if scale == 1.0:
        # d/dx (n / |t x|) = -n t^2 x / |t x|^3, d/dn = 1 / |t x|.
        t64, x64 = _as64(t), _as64(x)
        norm = np.linalg.norm(t64 * x64)
        np.testing.assert_allclose(grads[0], -2.0 * t64**2 * x64 / norm**3, rtol=1e-5)
        np.testing.assert_allclose(grads[1], 1.0 / norm, rtol=1e-6)
