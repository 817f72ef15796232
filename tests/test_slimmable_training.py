"""SlimCLR training pieces: weights, slow start, freeze_until, diagnostics, EMA."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_wa
from optax_wa import slimmable as sl

WIDTHS4 = (1.0, 0.75, 0.5, 0.25)


def _rngs(seed=0):
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _data(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize(
    "mode, want",
    [
        (0, [1.0, 1.0, 1.0, 1.0]),
        (1, [0.4, 0.3, 0.2, 0.1]),
        (2, [1.0, 0.75, 0.5, 0.25]),
        (3, [1.6, 1.2, 0.8, 0.4]),
        (5, [2.5, 1.0, 1.0, 1.0]),
        (6, [4 * 2.5 / 6.5, 4 * 1.75 / 6.5, 4 * 1.25 / 6.5, 4 * 1.0 / 6.5]),
        (7, [1.75, 1.0, 1.0, 1.0]),
    ],
)
def test_loss_weights_per_mode(mode, want):
    np.testing.assert_allclose(sl.slimclr_loss_weights(WIDTHS4, mode), want, rtol=1e-12)


def test_loss_weights_follow_the_order_of_widths():
    assert sl.slimclr_loss_weights((0.25, 1.0, 0.5), 5) == (1.0, 1.75, 1.0)


@pytest.mark.parametrize("mode", [4, 8, -1])
def test_loss_weights_reject_unknown_mode(mode):
    with pytest.raises(ValueError, match="mode must be one of"):
        sl.slimclr_loss_weights(WIDTHS4, mode)


def test_slow_start_schedule_switches_without_recompiling():
    schedule = sl.slow_start_schedule(
        (1.0, 0.5, 0.25), switch_step=3, distill_weight=0.5
    )
    traces = []

    @jax.jit
    def weights(step):
        traces.append(None)
        return schedule(step)

    before = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    # mode 5: lambda = (1.75, 1, 1); sub-widths split (1 - a) / a = 0.5 / 0.5.
    after = [1.75, 0.5, 0.5, 0.0, 0.5, 0.5]
    for step in range(6):
        want = before if step < 3 else after
        np.testing.assert_allclose(weights(jnp.int32(step)), want)
    assert len(traces) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(widths=(0.5, 1.0), switch_step=1), "strictly decreasing"),
        (dict(widths=(1.0, 0.5), switch_step=-1), "switch_step"),
        (dict(widths=(1.0, 0.5), switch_step=1.5), "switch_step"),
        (dict(widths=(1.0, 0.5), switch_step=1, distill_weight=1.5), "distill_weight"),
    ],
)
def test_slow_start_schedule_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sl.slow_start_schedule(**kwargs)


def _width_losses_setup():
    widths = (1.0, 0.5)
    model = sl.SlimmableMLP(6, (8,), widths, projection_dim=4, rngs=_rngs(0))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    x1, x2 = _data(1, 8, 6), _data(2, 8, 6)

    def losses(params):
        m = nnx.merge(graphdef, params, stats, copy=True)
        logits, contrast = [], []
        for w in widths:
            loss, lg = sl.nt_xent(m(x1, width=w), m(x2, width=w))
            contrast.append(loss)
            logits.append(lg)
        kd = [jnp.zeros(()), sl.contrastive_distillation(logits[1], logits[0])]
        return jnp.stack(contrast + kd)

    return params, losses


def test_vjp_form_equals_gradient_of_weighted_sum():
    params, losses = _width_losses_setup()
    weights = sl.slow_start_schedule((1.0, 0.5), switch_step=0)(0)
    traces = []

    @jax.jit
    def step(params, weights):
        traces.append(None)
        return sl.weighted_value_and_grad(losses)(params, weights)

    (total, per_width), grads = step(params, weights)

    @jax.jit
    def reference(params):
        value, grads = jax.value_and_grad(lambda p: jnp.dot(weights, losses(p)))(params)
        return value, grads, losses(params)

    want_total, want_grads, want_losses = reference(params)
    chex.assert_trees_all_close(grads, want_grads, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(total, want_total, rtol=1e-5)
    np.testing.assert_allclose(per_width, want_losses, rtol=1e-5)
    # New weights (the slow-start switch) reuse the compiled step.
    step(params, jnp.array([1.0, 0.0, 0.0, 0.0]))
    assert len(traces) == 1


def test_weighted_value_and_grad_rejects_non_vector_losses():
    with pytest.raises(ValueError, match="vector of losses"):
        sl.weighted_value_and_grad(lambda p: jnp.sum(p))(jnp.ones(2), jnp.ones(1))


def test_weighted_value_and_grad_returns_aux():
    f = sl.weighted_value_and_grad(
        lambda p: (jnp.stack([p, 2 * p]), "aux"), has_aux=True
    )
    (total, losses, aux), g = f(1.5, jnp.array([2.0, 1.0]))
    assert aux == "aux" and float(total) == 6.0 and float(g) == 4.0
    np.testing.assert_allclose(losses, [1.5, 3.0])


# --- freeze_until -------------------------------------------------------------

PARAMS = {"shared": jnp.array([1.0, -2.0, 3.0]), "sub": jnp.array([0.5, -0.25])}
MASK = {"shared": False, "sub": True}


def _optimizers():
    return {
        "adamw": lambda: optax.adamw(0.1, weight_decay=0.1),
        "sgd_wd_momentum": lambda: optax.chain(
            optax.add_decayed_weights(0.1), optax.sgd(0.1, momentum=0.9)
        ),
    }


def _grads(step):
    rng = np.random.default_rng(100 + step)
    return jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), PARAMS
    )


def _trajectory(opt, steps):
    params, state, history = PARAMS, opt.init(PARAMS), []
    update = jax.jit(opt.update)
    for t in range(steps):
        updates, state = update(_grads(t), state, params)
        params = optax.apply_updates(params, updates)
        history.append((params, state))
    return history


@pytest.mark.parametrize("form", ["end_of_chain", "wrapper"])
@pytest.mark.parametrize("name", sorted(_optimizers()))
def test_freeze_until_keeps_masked_leaves_bit_identical_then_releases(name, form):
    make, switch = _optimizers()[name], 3
    if form == "end_of_chain":
        opt = optax.chain(make(), sl.freeze_until(switch, MASK))
    else:
        opt = sl.freeze_until(switch, MASK, inner=make())
    history = _trajectory(opt, 5)
    for t, (params, _) in enumerate(history):
        if t < switch:  # updates 0 .. switch - 1 are frozen
            np.testing.assert_array_equal(params["sub"], PARAMS["sub"])
        else:
            assert np.all(params["sub"] != history[t - 1][0]["sub"])
        assert np.all(
            params["shared"] != (history[t - 1][0] if t else PARAMS)["shared"]
        )


def test_freeze_until_wrapper_starts_masked_leaves_with_fresh_inner_state():
    """With ``inner=``, the first update after the switch is a fresh SGD+wd+momentum step."""
    switch, lr, wd = 2, 0.1, 0.1
    inner = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=0.9))
    history = _trajectory(sl.freeze_until(switch, MASK, inner=inner), switch + 1)
    (params, state) = history[switch]
    trace = state.inner_state[1][0].trace
    # Fresh momentum: the trace of the masked leaf is its first gradient + decay.
    want_trace = _grads(switch)["sub"] + wd * PARAMS["sub"]
    np.testing.assert_allclose(trace["sub"], want_trace, rtol=1e-6)
    np.testing.assert_allclose(
        params["sub"], PARAMS["sub"] - lr * want_trace, rtol=1e-6
    )
    # Before the switch the masked entries of the inner state stayed at init.
    np.testing.assert_array_equal(
        history[switch - 1][1].inner_state[1][0].trace["sub"], 0.0
    )


def test_freeze_until_with_nnx_optimizer_and_sub_width_mask():
    model = sl.SlimmableMLP(4, (8,), (1.0, 0.5), projection_dim=2, rngs=_rngs(0))
    mask = sl.sub_width_mask(model)
    tx = sl.freeze_until(1, mask, inner=optax.adamw(0.1, weight_decay=0.5))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    before = nnx.clone(nnx.state(model, nnx.Param))
    grads = jax.tree.map(jnp.ones_like, before)
    optimizer.update(model, grads)
    after = nnx.state(model, nnx.Param)
    norms_before = before["blocks"][0]["norm"]["norms"]
    norms_after = after["blocks"][0]["norm"]["norms"]
    chex.assert_trees_all_equal(norms_after[1], norms_before[1])  # width 0.5: frozen
    assert np.all(norms_after[0]["scale"][...] != norms_before[0]["scale"][...])
    optimizer.update(model, grads)  # after the switch
    assert np.all(
        nnx.state(model, nnx.Param)["blocks"][0]["norm"]["norms"][1]["scale"][...]
        != norms_before[1]["scale"][...]
    )


@pytest.mark.parametrize("switch_step", [-1, 1.5, True])
def test_freeze_until_rejects_bad_switch_step(switch_step):
    with pytest.raises(ValueError, match="switch_step"):
        sl.freeze_until(switch_step, MASK)


def test_sub_width_mask_marks_only_narrower_switchable_variables():
    model = sl.SlimmableMLP(
        4, (8, 8), WIDTHS4, projection_dim=2, head_type="simclr", rngs=_rngs(0)
    )
    mask = sl.sub_width_mask(model)
    variables = nnx.state(model, nnx.Param)
    flat_mask = jax.tree.leaves(mask)
    flat_vars = jax.tree.leaves(
        variables, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    assert len(flat_mask) == len(flat_vars)
    for m, v in zip(flat_mask, flat_vars):
        assert m == (v.get_metadata().get("switch_width", 1.0) < 1.0)
    # 4 switchable norms (2 blocks, the head's hidden and output BN) x 3
    # narrower widths x (scale, bias).
    assert sum(flat_mask) == 24
    assert jax.tree.structure(mask) == jax.tree.structure(nnx.as_pure(variables))


# --- slimmable_grad_stats -------------------------------------------------------


def test_grad_stats_is_identity_and_records_closed_form_ratio():
    spec = {"w": sl.SlicedAxes((0, 1)), "b": sl.SlicedAxes(())}
    params = {"w": jnp.zeros((4, 4)), "b": jnp.zeros(3)}
    stats = sl.slimmable_grad_stats(spec, min_width=0.5)
    g = {"w": jnp.ones((4, 4)).at[:2, :2].set(2.0), "b": jnp.ones(3)}
    updates, state = jax.jit(stats.update)(g, stats.init(params))
    chex.assert_trees_all_equal(updates, g)
    # min block: 4 entries of 2 (norm 4); the other 12 entries of 1 (norm sqrt 12).
    np.testing.assert_allclose(state.ratios["['w']"], np.sqrt(12.0) / 4.0, rtol=1e-6)
    assert list(state.ratios) == ["['w']"]
    np.testing.assert_allclose(state.mean_ratio, np.sqrt(12.0) / 4.0, rtol=1e-6)


def test_grad_stats_is_zero_not_nan_for_zero_gradients():
    stats = sl.slimmable_grad_stats({"w": sl.SlicedAxes((0,))}, min_width=0.5)
    _, state = stats.update({"w": jnp.zeros(4)}, stats.init({"w": jnp.zeros(4)}))
    assert float(state.mean_ratio) == 0.0


def test_grad_stats_covers_every_sliced_parameter_of_a_model():
    model = sl.SlimmableCNN1D(1, (8, 8), (1.0, 0.25), projection_dim=4, rngs=_rngs(0))
    spec = sl.slim_axes_spec(model)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    stats = sl.slimmable_grad_stats(spec, 0.25)
    rng = np.random.default_rng(3)
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=p.shape) * rng.uniform(0.1, 10)), params
    )
    _, state = stats.update(grads, stats.init(params))
    flat = {
        jax.tree_util.keystr(path): np.asarray(leaf, np.float64)
        for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]
    }

    # The min-width (0.25) block of each sliced parameter, written out by hand
    # from the layer shapes: conv1 (5, 1, 8) slices its output, conv2 (5, 8, 8)
    # both channel axes, the head's fc1 (8, 8) both axes and its bias, fc2
    # (8, 4) its input only. BN parameters and fc2's bias are not sliced.
    blocks = {
        "['blocks'][0]['conv']['kernel']": np.s_[:, :, :2],
        "['blocks'][1]['conv']['kernel']": np.s_[:, :2, :2],
        "['head']['fc1']['kernel']": np.s_[:2, :2],
        "['head']['fc1']['bias']": np.s_[:2],
        "['head']['fc2']['kernel']": np.s_[:2, :],
    }
    assert sorted(state.ratios) == sorted(blocks)
    want = []
    for name, block in blocks.items():
        grad = flat[name]
        inside = np.sum(grad[block] ** 2)
        ratio = np.sqrt((np.sum(grad**2) - inside) / inside)
        np.testing.assert_allclose(state.ratios[name], ratio, rtol=1e-5)
        want.append(ratio)
    np.testing.assert_allclose(state.mean_ratio, np.mean(want), rtol=1e-5)


def test_grad_stats_rejects_mismatched_spec():
    stats = sl.slimmable_grad_stats({"w": sl.SlicedAxes((0,))}, min_width=0.5)
    with pytest.raises(ValueError, match="leaves"):
        stats.init({"w": jnp.zeros(4), "b": jnp.zeros(2)})


# --- momentum encoder and queue -------------------------------------------------


def test_key_encoder_update_is_exponential_moving_average():
    key = {"w": jnp.array([1.0, 2.0]), "h": jnp.array([4.0], jnp.bfloat16)}
    query = {"w": jnp.array([3.0, -2.0]), "h": jnp.array([0.0], jnp.bfloat16)}
    new = sl.update_key_encoder(key, query, 0.75)
    np.testing.assert_allclose(new["w"], [1.5, 1.0])
    assert new["h"].dtype == jnp.bfloat16 and float(new["h"][0]) == 3.0


def test_moco_momentum_rises_from_base_to_one():
    np.testing.assert_allclose(sl.moco_momentum(0, 10, 0.99), 0.99, rtol=1e-6)
    np.testing.assert_allclose(sl.moco_momentum(5, 10, 0.99), 0.995, rtol=1e-6)
    np.testing.assert_allclose(sl.moco_momentum(10, 10, 0.99), 1.0, rtol=1e-6)


def test_enqueue_replaces_oldest_keys_and_wraps():
    queue = sl.init_queue(jax.random.key(0), 4, 2)
    keys = jnp.array([[3.0, 4.0], [0.0, 2.0]])
    queue = sl.enqueue(sl.enqueue(queue, keys), 2 * keys)
    assert int(queue.ptr) == 0
    np.testing.assert_allclose(queue.keys, [[0.6, 0.8], [0.0, 1.0]] * 2, rtol=1e-6)
    queue = sl.enqueue(queue, -keys)
    np.testing.assert_allclose(queue.keys[:2], [[-0.6, -0.8], [0.0, -1.0]], rtol=1e-6)
    with pytest.raises(ValueError, match="multiple"):
        sl.enqueue(queue, jnp.ones((3, 2)))


@pytest.mark.parametrize("shape", [(2, 1), (2, 4), (2,), (2, 2, 1)])
def test_enqueue_rejects_wrong_feature_size_and_leaves_queue_intact(shape):
    """A (2, 1) batch used to overwrite half of two rows of a (4, 2) queue."""
    queue = sl.init_queue(jax.random.key(0), 4, 2)
    with pytest.raises(ValueError, match="keys must be"):
        sl.enqueue(queue, jnp.ones(shape))


def test_top_level_exports():
    assert optax_wa.slimmable is sl
    assert optax_wa.freeze_until is sl.freeze_until
    assert optax_wa.slimclr_loss_weights is sl.slimclr_loss_weights


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: sl.slimmable_grad_stats({}, min_width=0.0), "min_width"),
        (lambda: sl.init_queue(jax.random.key(0), 0, 4), "size"),
        (lambda: sl.moco_momentum(0, 0), "total_steps"),
        (lambda: sl.slimclr_loss_weights((1.0, 1.0)), "distinct"),
    ],
    ids=["grad_stats_width", "queue_size", "momentum_steps", "duplicate_widths"],
)
def test_training_pieces_reject_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
