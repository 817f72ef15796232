"""Tests of batch-statistics recalibration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import optax_wa


def _batches(num=3, size=8, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    return [
        jnp.asarray(rng.normal(i, 1.0 + i, (size, dim)), jnp.float32)
        for i in range(num)
    ]


def _stats_fn(params, x):
    return {"mean": x.mean(0), "var": x.var(0)}


def test_cumulative_average_equals_mean_of_batch_stats():
    batches = _batches()
    got = optax_wa.recalibrate_batch_stats(_stats_fn, None, batches)
    want_mean = np.mean([np.asarray(b).mean(0) for b in batches], axis=0)
    want_var = np.mean([np.asarray(b).var(0) for b in batches], axis=0)
    np.testing.assert_allclose(got["mean"], want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["var"], want_var, rtol=1e-5, atol=1e-6)


def test_weighted_by_batch_size_equals_pooled_mean():
    rng = np.random.default_rng(1)
    batches = [jnp.asarray(rng.normal(size=(n, 3)), jnp.float32) for n in (2, 5, 9)]
    got = optax_wa.recalibrate_batch_stats(
        _stats_fn, None, batches, weight_fn=lambda b: b.shape[0]
    )
    pooled = np.concatenate([np.asarray(b) for b in batches]).mean(0)
    np.testing.assert_allclose(got["mean"], pooled, rtol=1e-5, atol=1e-6)


def test_empty_batches_and_bad_weights_raise():
    with pytest.raises(ValueError, match="no batch"):
        optax_wa.recalibrate_batch_stats(_stats_fn, None, [])
    with pytest.raises(ValueError, match="positive"):
        optax_wa.recalibrate_batch_stats(
            _stats_fn, None, _batches(1), weight_fn=lambda b: 0
        )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_non_finite_or_negative_weight_raises(bad):
    # A NaN weight passes `weight <= 0` and would make every statistic NaN.
    with pytest.raises(ValueError, match="positive finite weight, got"):
        optax_wa.recalibrate_batch_stats(
            _stats_fn, None, _batches(2), weight_fn=lambda b: bad
        )
    # A bad weight on a later batch is caught too (before it is averaged in).
    weights = iter([2.0, bad])
    with pytest.raises(ValueError, match="positive finite weight"):
        optax_wa.recalibrate_batch_stats(
            _stats_fn, None, _batches(2), weight_fn=lambda b: next(weights)
        )


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 6, rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs)
        self.out = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(self.bn(self.lin(x)))


def test_nnx_recalibration_matches_manual_statistics():
    model = _Net(nnx.Rngs(0))
    model.bn.mean.value = jnp.full((6,), 100.0)  # stale statistics
    model.bn.var.value = jnp.full((6,), 100.0)
    params_before = nnx.state(model, nnx.Param)
    batches = _batches(num=3, size=16)
    optax_wa.recalibrate_nnx_batch_stats(model, batches)
    hidden = [np.asarray(model.lin(b)) for b in batches]
    np.testing.assert_allclose(
        model.bn.mean.value,
        np.mean([h.mean(0) for h in hidden], 0),
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        model.bn.var.value, np.mean([h.var(0) for h in hidden], 0), rtol=1e-4, atol=1e-5
    )
    # Parameters and the module's settings are untouched.
    jax.tree.map(
        np.testing.assert_array_equal, nnx.state(model, nnx.Param), params_before
    )
    assert model.bn.momentum == 0.99


def test_nnx_without_batchnorm_raises():
    with pytest.raises(ValueError, match="BatchNorm"):
        optax_wa.recalibrate_nnx_batch_stats(
            nnx.Linear(2, 2, rngs=nnx.Rngs(0)), _batches(1)
        )
