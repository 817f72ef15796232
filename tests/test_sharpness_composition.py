"""Sharpness-aware gradients in context: data parallel, BatchNorm, ensembles.

* 2 and 8 (fake CPU) devices under ``jax.shard_map``: synced ascent equals
  single-device full-batch SAM; per-device ascent equals the mean of per-shard
  SAM gradients.
* BatchNorm statistics returned as ``aux`` are those of a plain clean pass.
* Per-member norms: ``jax.vmap`` of the oracle over a 2-member stack whose
  gradient scales differ by 1000x equals two separate calls, and
  ``lookaround`` with SSAM per member equals the manual computation.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_wa

# ---------------------------------------------------------------- data parallel

BATCH = 16


def _varying(tree, axis):
    """``tree`` marked as varying over ``axis`` (``pcast`` from jax 0.9 on,
    ``pvary`` before)."""
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(tree, axis, to="varying")
    return jax.lax.pvary(tree, axis)


def _mlp_loss(params, x, y):
    h = jnp.tanh(x @ params["w"] + params["b"])
    return jnp.mean((h @ params["v"] - y) ** 2)


def _mlp_problem():
    keys = jax.random.split(jax.random.key(0), 5)
    params = {
        "w": jax.random.normal(keys[0], (3, 4)),
        "b": 0.1 * jax.random.normal(keys[1], (4,)),
        "v": jax.random.normal(keys[2], (4,)),
    }
    x = jax.random.normal(keys[3], (BATCH, 3))
    # Shards with different targets, so that per-shard ascents differ.
    y = jax.random.normal(keys[4], (BATCH,)) + jnp.repeat(jnp.arange(8.0), BATCH // 8)
    return params, x, y


def _data_parallel(fn, num_devices):
    """``fn(params, x, y)`` under shard_map: params replicated, the batch split."""
    mesh = jax.make_mesh((num_devices,), ("data",), devices=jax.devices()[:num_devices])
    mapped = jax.jit(
        jax.shard_map(
            fn, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P()
        )
    )

    def run(params, x, y):
        params = jax.device_put(params, NamedSharding(mesh, P()))
        x, y = jax.device_put((x, y), NamedSharding(mesh, P("data")))
        return mapped(params, x, y)

    return run


@pytest.mark.parametrize("num_devices", [2, 8])
@pytest.mark.parametrize("stable", [False, True], ids=["sam", "ssam"])
@pytest.mark.parametrize("sync_ascent", [True, False], ids=["synced", "per_device"])
def test_data_parallel_matches_single_device(num_devices, stable, sync_ascent):
    params, x, y = _mlp_problem()
    options = {"rho": 0.5, "stable": stable}
    oracle = _data_parallel(
        optax_wa.sam_value_and_grad(
            _mlp_loss, axis_name="data", sync_ascent=sync_ascent, **options
        ),
        num_devices,
    )
    (loss, _), grads, info = oracle(params, x, y)

    single = jax.jit(optax_wa.sam_value_and_grad(_mlp_loss, **options))
    (full_loss, _), full_grads, full_info = single(params, x, y)
    shard_outputs = [
        single(params, xs, ys)
        for xs, ys in zip(jnp.split(x, num_devices), jnp.split(y, num_devices))
    ]
    shard_mean = jax.tree.map(lambda *a: sum(a) / num_devices, *shard_outputs)
    (_, _), mean_grads, mean_info = shard_mean
    # The two references differ, so each comparison below can fail.
    assert not np.allclose(full_grads["v"], mean_grads["v"], rtol=1e-3)

    np.testing.assert_allclose(loss, full_loss, rtol=1e-5)
    if sync_ascent:
        chex.assert_trees_all_close(grads, full_grads, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(info, full_info, rtol=1e-5, atol=1e-6)
    else:
        chex.assert_trees_all_close(grads, mean_grads, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(info, mean_info, rtol=1e-5, atol=1e-6)


def test_data_parallel_wrapper_matches_oracle():
    params, x, y = _mlp_problem()
    inner = optax.sgd(0.1, momentum=0.9)
    opt = optax_wa.ssam(inner, rho=0.5, axis_name="data")

    def wrapper_step(params, x, y):
        # The device's own gradient: differentiate at a copy marked as varying
        # (at the replicated params, shard_map would sum it over devices).
        local_params = _varying(params, "data")
        grads = jax.grad(_mlp_loss)(local_params, x, y)
        updates, state = opt.update(
            grads,
            opt.init(params),
            params,
            grad_fn=lambda p: jax.grad(_mlp_loss)(p, x, y),
        )
        return updates, state.info

    def oracle_step(params, x, y):
        oracle = optax_wa.sam_value_and_grad(
            _mlp_loss, rho=0.5, stable=True, axis_name="data"
        )
        _, grads, info = oracle(params, x, y)
        updates, _ = inner.update(grads, inner.init(params), params)
        return updates, info._replace(adv_loss=None)

    got = _data_parallel(wrapper_step, 2)(params, x, y)
    expected = _data_parallel(oracle_step, 2)(params, x, y)
    chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- BatchNorm


class _BatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(1)(nn.relu(x))[..., 0]


def test_batch_stats_come_from_the_clean_pass():
    model = _BatchNormNet()
    x = jax.random.normal(jax.random.key(1), (32, 5))
    y = jnp.sin(x.sum(-1))
    variables = jax.jit(lambda key: model.init(key, x, train=False))(jax.random.key(2))
    params, batch_stats = variables["params"], variables["batch_stats"]

    @jax.jit
    def loss_fn(params, batch_stats, x, y):
        out, mutated = model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.mean((out - y) ** 2), mutated["batch_stats"]

    oracle = jax.jit(optax_wa.sam_value_and_grad(loss_fn, rho=0.5, has_aux=True))
    (loss, new_stats), _, _ = oracle(params, batch_stats, x, y)
    clean_loss, clean_stats = loss_fn(params, batch_stats, x, y)
    chex.assert_trees_all_close(new_stats, clean_stats, rtol=1e-6)
    np.testing.assert_allclose(loss, clean_loss, rtol=1e-6)
    # The perturbed pass would have given other statistics.
    g = jax.grad(lambda p: loss_fn(p, batch_stats, x, y)[0])(params)
    norm = optax.tree_utils.tree_l2_norm(g)
    adv = jax.tree.map(lambda p, gi: p + 0.5 * gi / norm, params, g)
    _, adv_stats = loss_fn(adv, batch_stats, x, y)
    assert not np.allclose(
        adv_stats["BatchNorm_0"]["mean"], clean_stats["BatchNorm_0"]["mean"], rtol=1e-3
    )


# ---------------------------------------------------------------- ensembles


def _member_loss(params):
    return sum(jnp.sum(0.5 * x**2 + jnp.sin(x)) for x in jax.tree.leaves(params))


def _two_members():
    """A 2-member stack: member 1's params (hence gradients) are 1000x member 0's."""
    keys = jax.random.split(jax.random.key(3), 2)
    one = {
        "w": jax.random.normal(keys[0], (4, 3)),
        "b": jax.random.normal(keys[1], (3,)),
    }
    return optax_wa.members.stack([one, jax.tree.map(lambda x: 1000.0 * x, one)])


@pytest.mark.parametrize(
    "options", [{}, {"perturbation": "usam", "rho": 0.2}], ids=["sam", "usam"]
)
def test_vmapped_oracle_uses_per_member_norms(options):
    stacked = _two_members()
    oracle = optax_wa.sam_value_and_grad(_member_loss, stable=True, **options)
    got = jax.jit(jax.vmap(oracle))(stacked)
    separate = [jax.jit(oracle)(m) for m in optax_wa.members.unstack(stacked)]
    expected = jax.tree.map(lambda *a: jnp.stack(a), *separate)
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)
    # A norm global over the stack would give another result for member 0.
    _, global_grads, _ = jax.jit(oracle)(stacked)
    assert not np.allclose(global_grads["w"][0], got[1]["w"][0], rtol=1e-3)
    assert got[2].gamma.shape == (2,)


def test_lookaround_with_ssam_per_member_equals_manual_computation():
    stacked = _two_members()
    lr, rho, sync_period, num_steps = 0.05, 0.1, 2, 4
    grad = jax.grad(_member_loss)
    opt = optax_wa.lookaround(
        optax_wa.ssam(optax.sgd(lr, momentum=0.9), rho=rho), sync_period=sync_period
    )
    update = jax.jit(lambda g, s, p: opt.update(g, s, p, grad_fn=grad))
    params, state = stacked, opt.init(stacked)
    for _ in range(num_steps):
        updates, state = update(jax.vmap(grad)(params), state, params)
        params = optax.apply_updates(params, updates)

    # Manual: each member runs SSAM + SGD momentum alone; every 2nd step all
    # members are replaced by their mean (momentum buffers are kept).
    oracle = jax.jit(optax_wa.sam_value_and_grad(_member_loss, rho=rho, stable=True))
    sgd = optax.sgd(lr, momentum=0.9)
    manual = optax_wa.members.unstack(stacked)
    sgd_states = [sgd.init(m) for m in manual]
    gammas = []
    for step in range(num_steps):
        for i, member in enumerate(manual):
            _, descent, info = oracle(member)
            updates, sgd_states[i] = sgd.update(descent, sgd_states[i], member)
            manual[i] = optax.apply_updates(member, updates)
            gammas.append(info.gamma)
        if (step + 1) % sync_period == 0:
            mean = jax.tree.map(lambda *a: sum(a) / len(a), *manual)
            manual = [mean] * len(manual)
    chex.assert_trees_all_close(
        params, optax_wa.members.stack(manual), rtol=1e-5, atol=1e-5
    )
    # The last step's gamma, one per member, is in the inner state.
    np.testing.assert_allclose(state.inner_state.info.gamma, gammas[-2:], rtol=1e-5)


# ---------------------------------------------------------------- chain order


@pytest.mark.parametrize(
    "inner",
    [
        lambda: optax_wa.lookaround(optax.sgd(0.1), sync_period=2),
        lambda: optax_wa.papa(optax.sgd(0.1), alpha=0.9),
        lambda: optax.chain(
            optax.clip_by_global_norm(1.0),
            optax_wa.lookaround(optax.sgd(0.1), sync_period=2),
        ),
    ],
    ids=["lookaround", "papa", "chain_with_lookaround"],
)
def test_params_rewriting_inner_raises_with_the_right_order(inner):
    # ssam(lookaround(sgd)) would take SAM's norms over all members and fail
    # later with a broadcasting error; the right order is lookaround(ssam(sgd)).
    stacked = _two_members()
    with pytest.raises(ValueError, match=r"lookaround\(ssam\("):
        optax_wa.ssam(inner(), rho=0.1).init(stacked)
    right = optax_wa.lookaround(optax_wa.ssam(optax.sgd(0.1), rho=0.1), sync_period=2)
    state = right.init(stacked)
    grad = jax.grad(_member_loss)
    updates, _ = right.update(jax.vmap(grad)(stacked), state, stacked, grad_fn=grad)
    chex.assert_tree_all_finite(updates)
