"""Tests of WASH (optax_wa.wash, optax_wa.shuffling)."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_wa
from optax_wa import _numerics, _permute, members, shuffling
from optax_wa.shuffling import shuffle_coordinates, wash_layer_probs

M = 8

# Explicit axes: jax.make_mesh's default in jax 0.10, not in jax 0.8.
EXPLICIT = (jax.sharding.AxisType.Explicit,)


def _params(m=M, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"w": jax.random.normal(k1, (m, 6, 5)), "b": jax.random.normal(k2, (m, 7))}


def _wide_params(m=M, seed=0, shape=(64, 50)):
    """N(0,1) values times exp(N(0, 5)): magnitudes over ~20 decades."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    scale = jnp.exp(5.0 * jax.random.normal(k2, (m, *shape)))
    return {"w": jax.random.normal(k1, (m, *shape)) * scale}


def _grads(step, m=M):
    return jax.tree.map(lambda x: 0.25 * x, _params(m, seed=100 + step))


_SHUFFLE = jax.jit(shuffle_coordinates, static_argnames=("probs", "axis_name"))


def _run(opt, params, steps=2, update=None):
    update = update or jax.jit(opt.update)
    state = jax.jit(opt.init)(params)
    for step in range(steps):
        grads = _grads(step, members.num_members(params))
        grads = jax.tree.map(lambda g, p: jax.device_put(g, p.sharding), grads, params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _wash(**kwargs):
    kwargs.setdefault("shuffle_prob", 0.3)
    kwargs.setdefault("layer_probs", "constant")
    return optax_wa.wash(optax.sgd(0.1, momentum=0.9), **kwargs)


# --- invariants of the shuffle -------------------------------------------------


def test_shuffle_keeps_the_multiset_of_member_values_per_coordinate():
    params = _params()
    out = _SHUFFLE(params, jax.random.key(1), 0.3)
    changed = 0
    for k in params:
        np.testing.assert_array_equal(
            np.sort(out[k], axis=0), np.sort(params[k], axis=0)
        )
        changed += int(np.sum(np.asarray(out[k]) != np.asarray(params[k])))
    assert changed > 0  # the test data did get shuffled


def test_shuffle_keeps_the_member_mean_up_to_the_sum_order():
    """Values move bit-exactly; the mean of the members then differs from the
    unshuffled one only by the order of the float32 sum."""
    params = _params()
    out = _SHUFFLE(params, jax.random.key(2), 0.5)
    assert not all(np.array_equal(out[k], params[k]) for k in params)
    for k in params:
        exact = np.mean(np.asarray(params[k], np.float64), axis=0)
        got = np.asarray(members.average_members(out)[k], np.float64)
        bound = M * np.finfo(np.float32).eps * np.sum(np.abs(params[k]), axis=0)
        assert np.all(np.abs(got - exact) <= bound)


def _check_moved_within_rounding(new, values, params, src):
    """Member ``i``'s new value is ``s = values[src[i]]`` up to the rounding of
    ``s - p`` and ``p + (s - p)`` (``p`` its parameter): exact when ``s`` and
    ``p`` are within a factor of 2, else within one ulp of ``max(|s|, |p|)``."""
    new, values, params = (np.asarray(x, np.float64) for x in (new, values, params))
    s = np.take_along_axis(values, np.asarray(src).astype(int), 0)
    np.testing.assert_array_equal(np.sort(s, 0), np.sort(values, 0))
    ulp = np.spacing(np.maximum(np.abs(s), np.abs(params)).astype(np.float32))
    err = np.abs(new - s)
    assert np.all(err <= ulp), np.max(err / ulp)
    ratio = s / np.where(params == 0, np.inf, params)
    sterbenz = (ratio >= 0.5) & (ratio <= 2.0)
    assert 0.0 < sterbenz.mean() < 1.0  # the data has both cases
    np.testing.assert_array_equal(new[sterbenz], s[sterbenz])


@pytest.mark.parametrize("lr, wide", [(0.0, False), (0.1, False), (0.1, True)])
def test_wash_moves_values_within_the_stated_rounding(lr, wide):
    """Non-integer values (N(0,1), and over 20 decades), zero and non-zero
    inner updates: the new params are the members' post-step values permuted
    per coordinate (the permutation read from ``shuffle_coordinates`` with
    the step's key, applied to member indices), up to the stated rounding."""
    params = _wide_params() if wide else _params()
    grads = jax.tree.map(
        lambda x: 0.25 * jax.random.normal(jax.random.key(9), x.shape), params
    )
    opt = optax_wa.wash(optax.sgd(lr), shuffle_prob=0.5)
    updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    step_key = jax.random.fold_in(jax.random.PRNGKey(0), 0)
    index = jax.tree.map(
        lambda x: (
            jnp.arange(M, dtype=jnp.float32).reshape((M,) + (1,) * (x.ndim - 1))
            * jnp.ones_like(x)
        ),
        params,
    )
    src = _SHUFFLE(index, step_key, 0.5)
    for k in params:
        g = np.asarray(grads[k])
        values = (np.asarray(params[k]) + g * np.float32(-lr)).astype(np.float32)
        assert np.any(np.asarray(new[k]) != values)  # something moved
        _check_moved_within_rounding(new[k], values, params[k], src[k])


def test_zero_probability_is_the_identity():
    params = _params()
    chex.assert_trees_all_equal(_SHUFFLE(params, jax.random.key(0), 0.0), params)
    plain, plain_state = _run(members.per_member(optax.sgd(0.1, momentum=0.9)), params)
    washed, state = _run(_wash(shuffle_prob=0.0), params)
    chex.assert_trees_all_equal(washed, plain)
    chex.assert_trees_all_equal(state.inner_state, plain_state)


def test_two_members_probability_one_swaps_or_keeps_every_coordinate():
    """p counts selections: with p = 1 every coordinate is selected and its
    permutation is uniform over both, so each is swapped with probability 1/2."""
    n = 4000
    a = jnp.arange(n, dtype=jnp.float32)
    tree = {"x": jnp.stack([a, -a - 1.0])}
    out = np.asarray(_SHUFFLE(tree, jax.random.key(3), 1.0)["x"])
    x = np.asarray(tree["x"])
    swapped = (out[0] == x[1]) & (out[1] == x[0])
    kept = (out[0] == x[0]) & (out[1] == x[1])
    assert np.all(swapped | kept)
    # Binomial(4000, 1/2): 5 standard deviations are 158.
    assert abs(swapped.sum() - n / 2) < 5 * np.sqrt(n / 4)


def test_selection_rate_matches_the_probability():
    """Two members: a coordinate changes iff selected and swapped, prob. p / 2."""
    n, p = 50_000, 0.02
    a = jnp.arange(n, dtype=jnp.float32)
    tree = {"x": jnp.stack([a, -a - 1.0])}
    out = np.asarray(_SHUFFLE(tree, jax.random.key(4), p)["x"])
    changed = int(np.sum(out[0] != np.asarray(tree["x"][0])))
    mean, std = n * p / 2, np.sqrt(n * p / 2 * (1 - p / 2))
    assert abs(changed - mean) < 5 * std, (changed, mean)


def test_permutations_are_uniform():
    """Three members, p = 1: the 6 permutations appear equally often."""
    n = 6000
    base = jnp.arange(3, dtype=jnp.float32)[:, None] * jnp.ones((3, n))
    out = np.asarray(_SHUFFLE({"x": base}, jax.random.key(5), 1.0)["x"])
    counts = {perm: 0 for perm in itertools.permutations(range(3))}
    for column in out.T.astype(int):
        counts[tuple(column)] += 1
    expected = n / 6
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 25.7, counts  # chi-square, 5 dof: P(> 25.7) ~ 1e-4


def test_extra_rounds_give_the_same_result(monkeypatch):
    """Tiny static slots and exchange buffers force many rounds; each item's
    draws depend only on its index, so the result is the one-round result."""
    params = _params()
    key = jax.random.key(6)
    one_round = _SHUFFLE(params, key, 0.4)
    monkeypatch.setattr(_numerics, "count_upper_bound", lambda mean, limit, tail=0: 2)
    stacked = jax.jit(lambda t: shuffle_coordinates(t, key, 0.4))
    named = jax.jit(
        jax.vmap(
            lambda t: shuffle_coordinates(t, key, 0.4, axis_name="m"), axis_name="m"
        )
    )
    chex.assert_trees_all_equal(stacked(params), one_round)
    chex.assert_trees_all_equal(named(params), one_round)


# --- the optimizer ---------------------------------------------------------------


def test_optimizer_state_moves_with_its_parameter():
    """After one step of SGD with momentum from zero state, the momentum of a
    member equals the gradient of the member whose parameter value it holds."""
    params = _params()
    grads = _grads(0)
    lr = 0.1
    for shuffle_opt_state in (True, False):
        opt = _wash(shuffle_prob=0.5, shuffle_opt_state=shuffle_opt_state)
        updates, state = jax.jit(opt.update)(grads, opt.init(params), params)
        new = optax.apply_updates(params, updates)
        (momentum,) = [
            s.trace for s in jax.tree.leaves(state.inner_state, is_leaf=_is_trace)
        ]
        for k in params:
            unshuffled = np.asarray(params[k] - lr * grads[k])
            got, mom, g = (
                np.asarray(new[k]),
                np.asarray(momentum[k]),
                np.asarray(grads[k]),
            )
            source = np.argmin(np.abs(got[:, None] - unshuffled[None]), axis=1)
            np.testing.assert_allclose(
                got, np.take_along_axis(unshuffled, source, 0), rtol=1e-6, atol=1e-6
            )
            moved = source != np.arange(M).reshape((M,) + (1,) * (got.ndim - 1))
            assert moved.any()
            expected = np.take_along_axis(g, source, 0) if shuffle_opt_state else g
            np.testing.assert_array_equal(mom, expected)


def _is_trace(x):
    return isinstance(x, optax.TraceState)


def test_same_seed_identical_different_seed_different():
    params = _params()
    opt = _wash(seed=3)
    update = jax.jit(opt.update)
    first, _ = _run(opt, params, update=update)
    second, _ = _run(_wash(seed=3), params, update=update)  # same function, cached
    other, _ = _run(_wash(seed=4), params)
    chex.assert_trees_all_equal(first, second)
    assert not all(np.array_equal(first[k], other[k]) for k in params)


def test_steps_use_different_keys():
    params = _params()
    opt = optax_wa.wash(optax.sgd(0.0), shuffle_prob=0.5)
    zero = jax.tree.map(jnp.zeros_like, params)
    state = opt.init(params)
    update = jax.jit(opt.update)
    first, state = update(zero, state, params)
    second, _ = update(zero, state, params)
    assert not all(np.array_equal(first[k], second[k]) for k in params)


def _named_equals_stacked(opt_named, stacked_params, stacked_state, map_fn):
    """Runs 2 steps in named mode through map_fn and returns the params."""
    init = map_fn(opt_named.init)
    update = map_fn(opt_named.update)
    state = init(stacked_params)
    params = stacked_params
    for step in range(2):
        grads = jax.tree.map(
            lambda g, p: jax.device_put(g, p.sharding), _grads(step), params
        )
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def test_stacked_equals_named_equals_sharded():
    params = _params()
    stacked, stacked_state = _run(_wash(shuffle_opt_state=True), params)

    vmapped = lambda f: jax.jit(jax.vmap(f, axis_name="members"))
    named, named_state = _named_equals_stacked(
        _wash(shuffle_opt_state=True, axis_name="members"), params, None, vmapped
    )
    chex.assert_trees_all_close(named, stacked, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(
        named_state.inner_state, stacked_state.inner_state, rtol=1e-6, atol=1e-6
    )

    mesh = jax.make_mesh((M,), ("members",), axis_types=EXPLICIT)
    with jax.set_mesh(mesh):
        sharded_params = jax.device_put(params, NamedSharding(mesh, P("members")))
        sharded, _ = _run(_wash(shuffle_opt_state=True), sharded_params)
    chex.assert_trees_all_close(sharded, stacked, rtol=1e-6, atol=1e-6)
    for leaf in jax.tree.leaves(sharded):
        assert leaf.sharding.spec[0] == "members"


def test_named_mode_inside_shard_map_with_several_members_per_device():
    params = _params()
    stacked, _ = _run(_wash(), params)
    mesh = jax.make_mesh((4,), ("members",), axis_types=EXPLICIT)

    def per_device(f):
        inner = jax.vmap(f, axis_name="local")
        return jax.jit(
            jax.shard_map(
                inner,
                mesh=mesh,
                in_specs=P("members"),
                out_specs=P("members"),
                check_vma=False,
            )
        )

    with jax.set_mesh(mesh):
        params = jax.device_put(params, NamedSharding(mesh, P("members")))
        named, _ = _named_equals_stacked(
            _wash(axis_name=("members", "local")), params, None, per_device
        )
    chex.assert_trees_all_close(named, stacked, rtol=1e-6, atol=1e-6)


def test_sharded_update_moves_only_selected_values():
    mesh = jax.make_mesh((M,), ("members",), axis_types=EXPLICIT)
    full = 100 * 100 * 4  # one member's tensor, float32
    moved = {}
    with jax.set_mesh(mesh):
        params = jax.device_put(
            {"w": jnp.zeros((M, 100, 100))}, NamedSharding(mesh, P("members"))
        )
        for p in (0.0, 0.01):
            opt = optax_wa.wash(optax.sgd(0.1), shuffle_prob=p, layer_probs="constant")
            state = jax.jit(opt.init)(params)
            compiled = jax.jit(opt.update).lower(params, state, params).compile()
            moved[p] = optax_wa.comm.collective_bytes(
                compiled, by_kind=True, in_loops=False
            )
    assert sum(moved[0.0].values()) == 0
    assert moved[0.01]["all-gather"] == 0
    assert 0 < sum(moved[0.01].values()) < 0.05 * full


def test_wash_must_get_params():
    opt = _wash()
    params = _params()
    with pytest.raises(ValueError, match="params"):
        opt.update(_grads(0), opt.init(params), None)


def test_bf16_params_shuffle_exactly():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params())
    out = _SHUFFLE(params, jax.random.key(7), 0.5)
    chex.assert_trees_all_equal_dtypes(out, params)
    for k in params:
        np.testing.assert_array_equal(
            np.sort(np.asarray(out[k], np.float32), 0),
            np.sort(np.asarray(params[k], np.float32), 0),
        )


# --- per-tensor probabilities ---------------------------------------------------


def _layers(indices, m=2):
    return {
        f"layers_{i}": {"kernel": jnp.zeros((m, 3, 3)), "bias": jnp.zeros((m, 3))}
        for i in indices
    }


def test_linear_schedule_follows_depth_order_not_key_order():
    indices = range(11)  # layers_10 sorts before layers_2
    order = [f"layers_{i}" for i in indices]
    probs = wash_layer_probs(_layers(indices), shuffle_prob=0.5, depth_order=order)
    for i in indices:
        expected = 0.5 * (1 - i / 10)
        assert probs[f"layers_{i}"]["kernel"] == pytest.approx(expected)
        assert probs[f"layers_{i}"]["bias"] == pytest.approx(expected)
    assert probs["layers_0"]["kernel"] == 0.5
    assert probs["layers_10"]["kernel"] == 0.0


def test_linear_schedule_callable_depth_order():
    params = _layers(range(3))
    depth = lambda path, leaf: int(
        jax.tree_util.keystr(path).split("_")[1].split("'")[0]
    )
    probs = wash_layer_probs(params, shuffle_prob=0.2, depth_order=depth)
    assert probs["layers_0"]["bias"] == 0.2
    assert probs["layers_1"]["kernel"] == pytest.approx(0.1)
    assert probs["layers_2"]["kernel"] == 0.0


def test_linear_schedule_in_wash_leaves_the_last_layer_untouched():
    params = jax.tree.map(
        lambda x: jax.random.normal(jax.random.key(0), x.shape), _layers(range(3), m=4)
    )
    order = ["layers_0", "layers_1", "layers_2"]
    opt = optax_wa.wash(optax.sgd(0.0), shuffle_prob=1.0, depth_order=order)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(opt.update)(zero, opt.init(params), params)
    chex.assert_trees_all_equal(updates["layers_2"], zero["layers_2"])
    assert np.any(np.asarray(updates["layers_0"]["kernel"]) != 0)


def test_callable_and_pytree_layer_probs():
    params = _layers(range(2))
    by_rank = lambda path, leaf: 0.1 * leaf.ndim  # leaf is one member's shape
    probs = wash_layer_probs(params, layer_probs=by_rank)
    assert probs["layers_0"]["kernel"] == pytest.approx(0.2)
    assert probs["layers_1"]["bias"] == pytest.approx(0.1)
    tree = {f"layers_{i}": {"kernel": 0.3, "bias": 0.0} for i in range(2)}
    assert wash_layer_probs(params, layer_probs=tree) == tree


# --- bad input ------------------------------------------------------------------


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_shuffle_prob_outside_unit_interval_raises(p):
    with pytest.raises(ValueError, match="shuffle_prob"):
        optax_wa.wash(optax.sgd(0.1), shuffle_prob=p)


def test_unknown_layer_probs_raises():
    with pytest.raises(ValueError, match="layer_probs"):
        optax_wa.wash(optax.sgd(0.1), layer_probs="quadratic")


def test_layer_probs_pytree_value_outside_unit_interval_raises():
    with pytest.raises(ValueError, match="layer_probs"):
        optax_wa.wash(optax.sgd(0.1), layer_probs={"w": 2.0})


def test_linear_without_depth_order_raises_at_init():
    opt = optax_wa.wash(optax.sgd(0.1), layer_probs="linear")
    with pytest.raises(ValueError, match="depth_order"):
        opt.init(_params())


def test_depth_order_with_another_schedule_raises():
    with pytest.raises(ValueError, match="depth_order"):
        optax_wa.wash(optax.sgd(0.1), layer_probs="constant", depth_order=["w"])


def test_depth_order_entry_matching_no_leaf_raises():
    with pytest.raises(ValueError, match="layer_2"):
        wash_layer_probs(
            _layers(range(3)), depth_order=["layers_0", "layers_1", "layer_2"]
        )


def test_depth_order_string_raises():
    with pytest.raises(ValueError, match="depth_order"):
        optax_wa.wash(optax.sgd(0.1), depth_order="layers_0")


def test_shuffle_opt_state_must_be_a_bool():
    with pytest.raises(ValueError, match="shuffle_opt_state"):
        optax_wa.wash(optax.sgd(0.1), shuffle_opt_state="yes")


def test_permute_members_stacked_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(K, M\)"):
        _permute.permute_members(jnp.zeros((2, 3)), jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="stacked values"):
        _permute.permute_members(jnp.zeros((2, 4)), jnp.zeros((3, 2), jnp.int32))


# --- the reference simulator's options --------------------------------------------


def _tagged(m, n):
    """Member i holds i + 0.25 * N(0,1): every value tells its member."""
    noise = 0.25 * jax.random.normal(jax.random.key(11), (m, n))
    return {"x": jnp.arange(m, dtype=jnp.float32)[:, None] + noise}


def test_default_probability_is_constant_and_depth_order_selects_linear():
    params = _layers(range(3), m=4)
    probs = wash_layer_probs(params, shuffle_prob=0.2)
    assert set(jax.tree.leaves(probs)) == {0.2}
    order = ["layers_0", "layers_1", "layers_2"]
    linear = wash_layer_probs(params, shuffle_prob=0.2, depth_order=order)
    assert linear["layers_0"]["kernel"] == 0.2 and linear["layers_2"]["bias"] == 0.0
    opt = optax_wa.wash(optax.sgd(0.1), shuffle_prob=0.2)  # works out of the box
    params = jax.tree.map(
        lambda x: jax.random.normal(jax.random.key(1), x.shape), params
    )
    updates, _ = opt.update(params, opt.init(params), params)
    chex.assert_trees_all_equal_shapes(updates, params)


def test_ring_moves_a_selected_value_to_a_neighbour():
    """Ring: each selected coordinate is the member values shifted cyclically
    by +1 or -1, both directions equally likely; p = 1 selects all."""
    m, n = 5, 4000
    tree = _tagged(m, n)
    out = np.asarray(_RING(tree, jax.random.key(12), 1.0)["x"])
    x = np.asarray(tree["x"])
    up = np.all(out == np.roll(x, -1, axis=0), axis=0)  # member i takes i + 1
    down = np.all(out == np.roll(x, 1, axis=0), axis=0)
    assert np.all(up | down)
    assert abs(up.sum() - n / 2) < 5 * np.sqrt(n / 4)


def test_ring_selection_rate_every_selected_value_moves():
    m, n, p = 4, 40_000, 0.05
    tree = _tagged(m, n)
    out = np.asarray(_RING(tree, jax.random.key(13), p)["x"])
    changed = np.any(out != np.asarray(tree["x"]), axis=0)
    assert abs(changed.sum() - n * p) < 5 * np.sqrt(n * p * (1 - p))


_RING = jax.jit(
    lambda t, k, p: shuffle_coordinates(t, k, p, topology="ring"),
    static_argnums=2,
)


@pytest.mark.parametrize("topology", ["full", "ring"])
def test_wash_topologies_in_stacked_and_named_modes(topology):
    params = _params()
    stacked, _ = _run(_wash(topology=topology), params)
    vmapped = lambda f: jax.jit(jax.vmap(f, axis_name="members"))
    named, _ = _named_equals_stacked(
        _wash(topology=topology, axis_name="members"), params, None, vmapped
    )
    chex.assert_trees_all_close(named, stacked, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prob_counts, moved", [("selections", 0.75), ("moves", 1.0)])
def test_prob_counts_the_values_that_change_member(prob_counts, moved):
    """Four members, full topology: a selected value changes member with
    probability 3/4, so "selections" moves p * 3/4 of the values and "moves"
    (selecting with p / (1 - 1/4)) moves p."""
    m, n, p = 4, 20_000, 0.3
    params = _tagged(m, n)
    opt = optax_wa.wash(optax.sgd(0.0), shuffle_prob=p, prob_counts=prob_counts)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(opt.update)(zero, opt.init(params), params)
    new = np.asarray(optax.apply_updates(params, updates)["x"])
    # Tags differ by about 1: a value that changed member is off by > 0.5.
    frac = np.mean(np.abs(new - np.asarray(params["x"])) > 1e-3)
    expected = p * moved
    assert abs(frac - expected) < 5 * np.sqrt(expected * (1 - expected) / (m * n))


def test_prob_counts_moves_above_one_raises():
    opt = optax_wa.wash(optax.sgd(0.1), shuffle_prob=0.6, prob_counts="moves")
    with pytest.raises(ValueError, match="shuffle_prob"):
        opt.init(_params(m=2))


def test_interval_skips_steps_and_shuffles_the_others_as_every_step():
    """interval=3 shuffles after updates 0, 3, 6 (0-based), as every-step
    WASH does at those counts; the other updates are the inner updates."""
    params = _params()
    every, sparse = _wash(), _wash(interval=3)
    inner = members.per_member(optax.sgd(0.1, momentum=0.9))
    state = sparse.init(params)
    for step in range(7):
        grads = _grads(step)
        got, new_state = jax.jit(sparse.update)(grads, state, params)
        plain, _ = inner.update(grads, state.inner_state, params)
        if step % 3:  # jit vs eager: up to XLA's fusion of the momentum
            chex.assert_trees_all_close(got, plain, rtol=1e-6, atol=1e-7)
        else:
            ref, _ = jax.jit(every.update)(grads, state, params)
            chex.assert_trees_all_equal(got, ref)
            assert not all(np.array_equal(got[k], plain[k]) for k in params)
        params, state = optax.apply_updates(params, got), new_state


def test_quantized_values_are_the_rounded_values():
    """bfloat16: a coordinate is either untouched or holds a permutation of
    its bf16-rounded values (identity selections round too); the rounded
    coordinates are a fraction p of all."""
    m, n, p = 4, 20_000, 0.2
    tree = {"x": jax.random.normal(jax.random.key(14), (m, n))}
    out = np.asarray(_QUANT(tree, jax.random.key(15), p, "bfloat16")["x"])
    assert out.dtype == np.float32
    x = np.asarray(tree["x"])
    rounded = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))
    same = np.all(out == x, axis=0)
    as_bf16 = np.all(np.sort(out, 0) == np.sort(rounded, 0), axis=0)
    assert np.all(same | as_bf16)
    selected = as_bf16 & ~same
    assert abs(selected.sum() - n * p) < 5 * np.sqrt(n * p * (1 - p))


def test_float16_wire_saturates_and_rounds_to_nearest():
    x = np.array(
        [[1e6, -1e6, 1e-9, 0.1, 3.0e-6], [2.0, 3.0, 4.0, 5.0, 6.0]], np.float32
    )
    out = np.asarray(
        _QUANT({"x": jnp.asarray(x)}, jax.random.key(0), 1.0, "float16")["x"]
    )
    expected = np.clip(x, -65504, 65504).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(np.sort(out, 0), np.sort(expected, 0))
    assert np.all(np.isfinite(out))


_QUANT = jax.jit(
    lambda t, k, p, q: shuffle_coordinates(t, k, p, quantize=q),
    static_argnums=(2, 3),
)


def test_quantized_exchange_halves_the_bytes():
    mesh = jax.make_mesh((M,), ("members",), axis_types=EXPLICIT)
    by = {}
    with jax.set_mesh(mesh):
        params = jax.device_put(
            {"w": jnp.zeros((M, 100, 100))}, NamedSharding(mesh, P("members"))
        )
        for q in (None, "bfloat16", "float16"):
            opt = optax_wa.wash(optax.sgd(0.1), shuffle_prob=0.01, quantize=q)
            state = jax.jit(opt.init)(params)
            compiled = jax.jit(opt.update).lower(params, state, params).compile()
            by[q] = optax_wa.comm.collective_bytes(compiled, by_kind=True)
    assert by[None]["all-to-all"] > 0
    for q in ("bfloat16", "float16"):
        assert 2 * by[q]["all-to-all"] == by[None]["all-to-all"]
        assert by[q]["all-reduce"] == by[None]["all-reduce"]


# --- hardening ---------------------------------------------------------------------


def test_inject_hyperparams_with_default_and_injected_integers():
    """seed and interval are injected as integer arrays (traced under jit)."""
    params = _params()
    for kwargs in ({}, {"interval": 2, "seed": 5}):
        plain, _ = _run(_wash(**kwargs), params, steps=3)
        injected = optax.inject_hyperparams(optax_wa.wash, static_args="shuffle_prob")(
            optax.sgd(0.1, momentum=0.9), shuffle_prob=0.3, **kwargs
        )
        got, state = _run(injected, params, steps=3)
        chex.assert_trees_all_equal(got, plain)
        assert state.hyperparams["seed"].dtype == jnp.int32


def test_injected_shuffle_prob_under_jit_names_static_args():
    opt = optax.inject_hyperparams(optax_wa.wash)(optax.sgd(0.1), shuffle_prob=0.3)
    params = _params()
    with pytest.raises(ValueError, match="static_args"):
        jax.jit(opt.update)(_grads(0), opt.init(params), params)


def test_empty_leaf_is_left_alone():
    params = dict(_params(), e=jnp.zeros((M, 0)))
    opt = _wash()
    updates, _ = jax.jit(opt.update)(
        jax.tree.map(jnp.ones_like, params), opt.init(params), params
    )
    assert updates["e"].shape == (M, 0)
    assert not np.array_equal(updates["w"], -0.1 * np.ones((M, 6, 5), np.float32))


def test_tree_map_params_builds_state_shardings():
    mesh = jax.make_mesh((M,), ("members",), axis_types=EXPLICIT)
    for opt in (_wash(), _wash(shuffle_opt_state=True, interval=2)):
        params = _params()
        state = opt.init(params)
        member = NamedSharding(mesh, P("members"))
        param_shardings = {"w": member, "b": member}
        shardings = optax.tree_utils.tree_map_params(
            opt,
            lambda _, s: s,
            state,
            param_shardings,
            transform_non_params=lambda _: NamedSharding(mesh, P()),
        )
        (trace,) = [
            s.trace for s in jax.tree.leaves(shardings.inner_state, is_leaf=_is_trace)
        ]
        assert trace == {"w": member, "b": member}
        assert shardings.count == NamedSharding(mesh, P())
        placed = jax.device_put(state, shardings)
        assert placed.inner_state[0].trace["w"].sharding.spec == P("members")
        doubled = optax.tree_utils.tree_map_params(opt, lambda x: 2 * x, state)
        chex.assert_trees_all_equal(doubled.key, state.key)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"seed": True}, "seed"),
        ({"seed": 0.5}, "seed"),
        ({"seed": jnp.float32(1.0)}, "seed"),
        ({"interval": 0}, "interval"),
        ({"interval": 1.5}, "interval"),
        ({"topology": "star"}, "topology"),
        ({"prob_counts": "values"}, "prob_counts"),
        ({"quantize": "int8"}, "quantize"),
        ({"quantize": jnp.bfloat16}, "quantize"),
    ],
)
def test_bad_options_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        optax_wa.wash(optax.sgd(0.1), **kwargs)


def test_integer_array_seed_equals_python_seed():
    params = _params()
    a, _ = _run(_wash(seed=7), params)
    b, _ = _run(_wash(seed=np.int64(7)), params)
    c, _ = _run(_wash(seed=jnp.asarray(7)), params)
    chex.assert_trees_all_equal(a, b)
    chex.assert_trees_all_equal(a, c)


@pytest.mark.parametrize("wrap", [lambda f: f, jax.jit, jax.checkpoint])
def test_execution_depth_order_follows_the_forward_pass(wrap):
    """12 layers (layers_10 sorts before layers_2), each kernel read before its
    bias, plus a tensor the pass never reads: depth = order of first read."""
    params = {
        f"layers_{i}": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))}
        for i in range(12)
    }
    params["unused"] = jnp.ones(3)

    def forward(p, x):
        for i in range(12):
            x = jnp.tanh(x @ p[f"layers_{i}"]["kernel"] + p[f"layers_{i}"]["bias"])
        return x

    order = shuffling.execution_depth_order(wrap(forward), params, jnp.ones((2, 4)))
    probs = wash_layer_probs(params, shuffle_prob=0.5, depth_order=order, stacked=False)
    num_depths = 2 * 12 + 1  # kernels, biases, then the unused tensor
    for i in range(12):
        for j, name in enumerate(("kernel", "bias")):
            expected = 0.5 * (1 - (2 * i + j) / (num_depths - 1))
            assert probs[f"layers_{i}"][name] == pytest.approx(expected)
    assert probs["unused"] == 0.0


def test_execution_depth_order_skips_literal_operands():
    """A ReLU's ``max(x, 0.0)`` and a scale ``x * 2.0`` read constants
    (jaxpr literals, not hashable), which are no tensors of the params."""
    params = {"b_second": jnp.ones((4, 2)), "a_first": jnp.ones((3, 4))}

    def forward(p, x):
        return jnp.maximum(2.0 * x @ p["a_first"], 0.0) @ p["b_second"]

    order = shuffling.execution_depth_order(forward, params, jnp.ones((1, 3)))
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    depths = {jax.tree_util.keystr(p): order(p, x) for p, x in paths}
    assert depths == {"['a_first']": 0, "['b_second']": 1}


def test_quantized_named_exchange_equals_stacked():
    """16-bit values cross the named exchange as their bits, unchanged."""
    params = _params()
    opts = [_wash(quantize=q, shuffle_opt_state=True) for q in ("bfloat16", "float16")]
    for q, opt in zip(("bfloat16", "float16"), opts):
        stacked, _ = _run(opt, params)
        vmapped = lambda f: jax.jit(jax.vmap(f, axis_name="members"))
        named, _ = _named_equals_stacked(
            _wash(quantize=q, shuffle_opt_state=True, axis_name="members"),
            params,
            None,
            vmapped,
        )
        chex.assert_trees_all_close(named, stacked, rtol=1e-6, atol=1e-6)
