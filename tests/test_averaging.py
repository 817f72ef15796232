"""Analytic and equivalence tests of lookaround and papa."""

import itertools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import optax_wa
from optax_wa import members


def _run(opt, params, grads_seq, update=None):
    update = update or opt.update
    state = opt.init(params)
    trajectory = []
    for grads in grads_seq:
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        trajectory.append(params)
    return trajectory, state


def _random_grads(num_steps, m, seed=0):
    keys = jax.random.split(jax.random.key(seed), num_steps)
    return [
        {
            "w": jax.random.normal(k, (m, 3, 2)),
            "b": jax.random.normal(jax.random.fold_in(k, 1), (m, 2)),
        }
        for k in keys
    ]


def _random_params(m, seed=42):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"w": jax.random.normal(k1, (m, 3, 2)), "b": jax.random.normal(k2, (m, 2))}


# --- Lookaround -------------------------------------------------------------


def test_lookaround_one_member_equals_inner():
    inner = optax.sgd(0.1, momentum=0.9, nesterov=True)
    params = _random_params(1)
    grads = _random_grads(7, 1)
    got, _ = _run(optax_wa.lookaround(inner, sync_period=3), params, grads)
    single = jax.tree.map(lambda x: x[0], params)
    want, _ = _run(inner, single, [jax.tree.map(lambda x: x[0], g) for g in grads])
    for g, w in zip(got, want):
        chex.assert_trees_all_close(
            jax.tree.map(lambda x: x[0], g), w, rtol=1e-6, atol=1e-6
        )


def test_lookaround_hand_traced_two_syncs():
    # Two members, SGD lr=1, k=2:
    # (1, 3) -g(1,-1)-> (0, 4) -g(1,-1)-> (-1, 5) -sync-> (2, 2)
    #        -g(1,.5)-> (1, 1.5) -g(-1,.5)-> (2, 1) -sync-> (1.5, 1.5)
    opt = optax_wa.lookaround(optax.sgd(1.0), sync_period=2)
    params = {"w": jnp.array([1.0, 3.0])}
    grads = [jnp.array(g) for g in ([1.0, -1.0], [1.0, -1.0], [1.0, 0.5], [-1.0, 0.5])]
    trajectory, state = _run(opt, params, [{"w": g} for g in grads])
    expected = [[0.0, 4.0], [2.0, 2.0], [1.0, 1.5], [1.5, 1.5]]
    for got, want in zip(trajectory, expected):
        np.testing.assert_allclose(got["w"], want, rtol=0, atol=1e-7)
    assert int(state.count) == 4


def _numpy_lookaround(w, grads, lr, beta, k, policy):
    """Reference: heavy-ball SGD per member, average every k steps."""
    w = np.array(w, np.float64)
    mom = np.zeros_like(w)
    out = []
    for t, g in enumerate(grads, start=1):
        mom = beta * mom + np.asarray(g)
        w = w - lr * mom
        if t % k == 0:
            w = np.broadcast_to(w.mean(0), w.shape).copy()
            if policy == "average":
                mom = np.broadcast_to(mom.mean(0), mom.shape).copy()
            elif policy == "reset":
                mom = np.zeros_like(mom)
        out.append((w.copy(), mom.copy()))
    return out


@pytest.mark.parametrize("policy", ["keep", "average", "reset"])
def test_lookaround_state_policies_match_reference(policy):
    m, k, lr, beta = 3, 3, 0.1, 0.9
    params = {"w": jax.random.normal(jax.random.key(0), (m, 4))}
    grads = [{"w": g["b"][:, :2].repeat(2, axis=1)} for g in _random_grads(7, m)]
    opt = optax_wa.lookaround(
        optax.sgd(lr, momentum=beta), sync_period=k, state_policy=policy
    )
    trajectory, state = _run(opt, params, grads, update=jax.jit(opt.update))
    reference = _numpy_lookaround(
        params["w"], [g["w"] for g in grads], lr, beta, k, policy
    )
    for got, (w_ref, _) in zip(trajectory, reference):
        np.testing.assert_allclose(got["w"], w_ref, rtol=1e-5, atol=1e-6)
    momentum = state.inner_state[0].trace["w"]
    np.testing.assert_allclose(momentum, reference[-1][1], rtol=1e-5, atol=1e-6)
    # After the step-6 sync and one more step the members' momenta differ
    # under "keep" and agree up to the last gradient under the other policies.
    _, mom_at_sync = reference[5]
    spread = np.ptp(mom_at_sync, axis=0).max()
    assert (spread > 1e-3) if policy == "keep" else (spread < 1e-12)


def test_lookaround_reset_keeps_step_counters():
    inner = optax.adam(optax.linear_schedule(1.0, 0.0, 10))
    opt = optax_wa.lookaround(inner, sync_period=2, state_policy="reset")
    params = _random_params(2)
    _, state = _run(opt, params, _random_grads(4, 2))
    adam_state = state.inner_state[0]
    np.testing.assert_array_equal(adam_state.count, [4, 4])
    np.testing.assert_array_equal(adam_state.mu["w"], 0.0)  # reset at step 4


def test_lookaround_off_sync_steps_skip_the_average():
    opt = optax_wa.lookaround(optax.sgd(0.1), sync_period=5)
    params = _random_params(4)
    jaxpr = jax.make_jaxpr(opt.update)(_random_grads(1, 4)[0], opt.init(params), params)
    assert "cond" in str(jaxpr), "the sync must be a lax.cond"


def test_lookaround_first_sync_after_k_updates():
    opt = optax_wa.lookaround(optax.sgd(1.0), sync_period=3)
    params = {"w": jnp.array([0.0, 10.0])}
    grads = [{"w": jnp.array([1.0, -1.0])}] * 3
    trajectory, _ = _run(opt, params, grads)
    np.testing.assert_allclose(trajectory[1]["w"], [-2.0, 12.0])
    np.testing.assert_allclose(trajectory[2]["w"], [5.0, 5.0])


# --- PAPA -------------------------------------------------------------------


def test_papa_pull_is_exact():
    alpha, period, lr = 0.9, 2, 0.5
    params = {"w": jnp.array([[0.0, 1.0], [2.0, 5.0], [4.0, -3.0]])}
    grads = [{"w": jnp.full((3, 2), float(i + 1))} for i in range(4)]
    opt = optax_wa.papa(optax.sgd(lr), alpha=alpha, period=period)
    trajectory, _ = _run(opt, params, grads)
    w = np.asarray(params["w"], np.float64)
    for t, (g, got) in enumerate(zip(grads, trajectory), start=1):
        w = w - lr * np.asarray(g["w"])
        if t % period == 0:
            w = alpha * w + (1 - alpha) * w.mean(0)
        np.testing.assert_allclose(got["w"], w, rtol=1e-6, atol=1e-6)


def test_papa_alpha_schedule_is_evaluated_at_the_pull_step():
    params = {"w": jnp.array([[0.0], [4.0]])}
    opt = optax_wa.papa(
        optax.sgd(0.0), alpha=lambda count: 1.0 - 0.25 * count, period=2
    )
    trajectory, _ = _run(opt, params, [{"w": jnp.zeros((2, 1))}] * 4)
    # Pull at update index 1 (alpha 0.75) then at index 3 (alpha 0.25).
    np.testing.assert_allclose(trajectory[1]["w"], [[0.5], [3.5]])
    np.testing.assert_allclose(trajectory[3]["w"], [[1.625], [2.375]])


def test_papa_alpha_one_is_inner_and_alpha_zero_is_average():
    params = _random_params(3)
    grads = _random_grads(4, 3)
    inner = optax.sgd(0.1, momentum=0.9)
    plain, _ = _run(members.per_member(inner), params, grads)
    same, _ = _run(optax_wa.papa(inner, alpha=1.0, period=2), params, grads)
    chex.assert_trees_all_close(plain[-1], same[-1], rtol=1e-6, atol=1e-6)
    averaged, _ = _run(optax_wa.papa(inner, alpha=0.0, period=2), params, grads)
    chex.assert_trees_all_close(
        averaged[1], members.member_mean(averaged[1]), rtol=1e-6, atol=1e-6
    )
    # ... and the members hold the right mean: the NumPy heavy-ball reference
    # averaged after step 2.
    for name in ("w", "b"):
        reference = _numpy_lookaround(
            params[name], [g[name] for g in grads], 0.1, 0.9, 2, "keep"
        )
        np.testing.assert_allclose(
            averaged[1][name], reference[1][0], rtol=1e-6, atol=1e-6
        )
        np.testing.assert_allclose(
            averaged[3][name], reference[3][0], rtol=1e-6, atol=1e-6
        )


def test_papa_lr_scaled_alpha_reads_the_base_rate_not_schedule_zero():
    schedule = optax.linear_schedule(0.2, 0.0, 10)
    current = optax_wa.papa_lr_scaled_alpha(0.99, schedule, 0.2, rate="current")
    np.testing.assert_allclose(current(0), 0.99, rtol=1e-6)
    np.testing.assert_allclose(current(5), 1 - 0.01 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(current(10), 1.0, rtol=1e-6)
    # The released reading: the rate of the next update.
    following = optax_wa.papa_lr_scaled_alpha(0.99, schedule, 0.2)
    np.testing.assert_allclose(following(4), 1 - 0.01 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(following(9), 1.0, rtol=1e-6)
    # A warmup starts at lr(0) = 0: the base rate is not schedule(0).
    warm = optax.warmup_cosine_decay_schedule(0.0, 0.4, 4, 20, 0.004)
    assert float(warm(0)) == 0.0
    for reading in ("next", "current"):
        alpha = optax_wa.papa_lr_scaled_alpha(0.9, warm, 0.4, rate=reading)
        shift = 1 if reading == "next" else 0
        for c in range(21):
            want = 1 - float(warm(c + shift)) / 0.4 * 0.1
            np.testing.assert_allclose(alpha(c), want, rtol=1e-6)
    np.testing.assert_allclose(
        optax_wa.papa_lr_scaled_alpha(0.9, warm, 0.4, rate="current")(0), 1.0
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=1.5), "alpha"),
        (dict(alpha=True), "alpha"),
        (dict(alpha=np.ones(2) * 0.5), "alpha"),
        (dict(base_rate=0.0), "base_rate"),
        (dict(base_rate=True), "base_rate"),
        (dict(base_rate=float("nan")), "base_rate"),
        (dict(rate="previous"), "rate"),
    ],
)
def test_papa_lr_scaled_alpha_rejects_bad_input(kwargs, match):
    args = dict(alpha=0.9, learning_rate=0.1, base_rate=0.1) | kwargs
    with pytest.raises(ValueError, match=match):
        optax_wa.papa_lr_scaled_alpha(**args)


# --- PAPA exactly as released (SamsungSAILMontreal/PAPA, main.py) -------------


def _released_papa_loop(w0, b0, rs0, lrs, base, alpha, k, steps_per_epoch, epochs):
    """The released loop in NumPy (float64), per batch i of every epoch:

    forward (running statistics move), SGD step with torch's coupled weight
    decay and momentum at rate lrs[t], scheduler step (t += 1), then, if
    i % k == 0, alpha_t = 1 - (lrs[t] / base)(1 - alpha) and every member,
    params and running statistics, becomes alpha_t w + (1 - alpha_t) mean(w).
    Gradients: those of 0.5 * sum(c * w^2) + noise(t).
    """
    w, b, rs = (np.array(x, np.float64) for x in (w0, b0, rs0))
    buf_w, buf_b = np.zeros_like(w), np.zeros_like(b)
    out, t = [], 0
    for _ in range(epochs):
        for i in range(steps_per_epoch):
            gw, gb = _released_grads(w, b, t)
            rs = 0.9 * rs + 0.1 * _batch_stat(t, rs.shape)
            buf_w = 0.9 * buf_w + gw + 5e-4 * w
            buf_b = 0.9 * buf_b + gb + 5e-4 * b
            w, b = w - lrs[t] * buf_w, b - lrs[t] * buf_b
            t += 1
            if i % k == 0:
                a = 1 - (lrs[t] / base) * (1 - alpha)
                w, b, rs = (a * x + (1 - a) * x.mean(0) for x in (w, b, rs))
            out.append((w.copy(), b.copy(), rs.copy()))
    return out


_CURVATURE = np.linspace(0.5, 2.0, 4)


def _released_grads(w, b, t):
    rng = np.random.default_rng(1000 + t)
    return (
        _CURVATURE * w + rng.normal(size=w.shape),
        0.3 * b + rng.normal(size=b.shape),
    )


def _batch_stat(t, shape):
    return np.random.default_rng(5000 + t).normal(size=shape)


def _papa_as_released(schedule, base, steps_per_epoch, epochs=2, k=5, alpha=0.9):
    m = 3
    rng = np.random.default_rng(7)
    w0 = rng.normal(size=(m, 4)) * np.array([[0.3], [1.1], [2.7]])
    b0 = rng.normal(size=(m, 2)) + 0.25
    rs0 = rng.normal(size=(m, 4)) * 0.5
    num = steps_per_epoch * epochs
    lrs = [float(schedule(t)) for t in range(num + 1)]
    reference = _released_papa_loop(
        w0, b0, rs0, lrs, base, alpha, k, steps_per_epoch, epochs
    )
    inner = optax.chain(
        optax.add_decayed_weights(5e-4), optax.sgd(schedule, momentum=0.9)
    )
    alpha_t = optax_wa.papa_lr_scaled_alpha(alpha, schedule, base)
    period = optax_wa.sync_schedule(k, steps_per_epoch=steps_per_epoch)
    opt = optax_wa.papa(inner, alpha=alpha_t, period=period)
    params = {"w": jnp.asarray(w0, jnp.float32), "b": jnp.asarray(b0, jnp.float32)}
    rs = jnp.asarray(rs0, jnp.float32)
    state = opt.init(params)
    update = jax.jit(opt.update)
    for t, (w_ref, b_ref, rs_ref) in enumerate(reference):
        gw, gb = _released_grads(np.asarray(params["w"]), np.asarray(params["b"]), t)
        grads = {"w": jnp.asarray(gw, jnp.float32), "b": jnp.asarray(gb, jnp.float32)}
        rs = 0.9 * rs + 0.1 * jnp.asarray(_batch_stat(t, rs.shape), jnp.float32)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        # Running statistics: pulled at the same steps with the same weight.
        weight = optax_wa.sync_weight(alpha_t, period, state.count)
        rs = members.pull_to_mean(rs, weight)
        np.testing.assert_allclose(params["w"], w_ref, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(params["b"], b_ref, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(rs, rs_ref, rtol=1e-6, atol=1e-6)
    return reference


@pytest.mark.parametrize("steps_per_epoch", [20, 23])
def test_papa_equals_the_released_loop(steps_per_epoch):
    base = 0.05
    schedule = optax.cosine_decay_schedule(base, 2 * steps_per_epoch, alpha=0.1)
    reference = _papa_as_released(schedule, base, steps_per_epoch)
    # The test can fail: pulling after every 5th update of the run instead
    # moves the params by far more than the tolerance.
    w0 = reference[0][0]
    assert np.ptp(w0, axis=0).max() > 0.1  # members differ: pulls matter
    lrs = [float(schedule(t)) for t in range(2 * steps_per_epoch + 1)]
    rng = np.random.default_rng(7)
    shifted = _released_papa_loop(
        rng.normal(size=(3, 4)) * np.array([[0.3], [1.1], [2.7]]),
        rng.normal(size=(3, 2)) + 0.25,
        rng.normal(size=(3, 4)) * 0.5,
        [0.0] + lrs,  # every pull one update later
        base,
        0.9,
        5,
        steps_per_epoch,
        2,
    )
    assert np.abs(shifted[-1][0] - reference[-1][0]).max() > 1e-3


def test_papa_with_a_warmup_from_zero_stays_finite_and_released():
    base = 0.05
    schedule = optax.warmup_cosine_decay_schedule(0.0, base, 6, 40, 0.005)
    assert float(schedule(0)) == 0.0
    reference = _papa_as_released(schedule, base, steps_per_epoch=20)
    assert np.isfinite(reference[-1][0]).all()


def test_sync_schedule_is_the_released_per_epoch_schedule():
    released = optax_wa.sync_schedule(5, steps_per_epoch=12)
    counts = [c for c in range(1, 37) if bool(released(c))]
    # Batch index i = (c - 1) % 12 with i % 5 == 0: i in {0, 5, 10}.
    assert counts == [1, 6, 11, 13, 18, 23, 25, 30, 35]
    whole_run = optax_wa.sync_schedule(5)
    assert [c for c in range(1, 16) if bool(whole_run(c))] == [5, 10, 15]
    for c in range(1, 16):
        assert bool(optax_wa.is_sync_step(5, c)) == (c % 5 == 0)
        assert bool(optax_wa.is_sync_step(released, c)) == bool(released(c))


def test_lookaround_accepts_a_sync_schedule():
    schedule = optax_wa.sync_schedule(2, steps_per_epoch=3)  # after updates 1, 3, 4, 6
    params, grads = _random_params(3), _random_grads(6, 3)
    trajectory, _ = _run(
        optax_wa.lookaround(optax.sgd(0.1), sync_period=schedule), params, grads
    )
    w = np.asarray(params["w"], np.float64)
    for c, (g, got) in enumerate(zip(grads, trajectory), start=1):
        w = w - 0.1 * np.asarray(g["w"])
        if c in (1, 3, 4, 6):
            w = np.broadcast_to(w.mean(0), w.shape).copy()
        np.testing.assert_allclose(got["w"], w, rtol=1e-6, atol=1e-6)


# --- PAPA-2 and PAPA-all ------------------------------------------------------


@pytest.mark.parametrize("m", [2, 3, 4, 5])
def test_papa_pair_half_mixes_the_released_pairs(m):
    params = {"w": jax.random.normal(jax.random.key(m), (m, 6))}
    opt = optax_wa.papa(optax.sgd(0.0), period=1, combine="pair_half", seed=3)
    zeros = jax.tree.map(jnp.zeros_like, params)
    trajectory, _ = _run(opt, params, [zeros, zeros])
    w = np.asarray(params["w"], np.float64)
    table = [(0, 1), (0, 1)] if m == 2 else list(itertools.combinations(range(m), 2))
    want = sorted(tuple(np.round(0.5 * (w[a] + w[b]), 5)) for a, b in table[:m])
    got = np.asarray(trajectory[0]["w"], np.float64)
    assert sorted(tuple(np.round(row, 5)) for row in got) == want
    # Each draw is a new permutation of the same pairs, the same on every run.
    again, _ = _run(opt, params, [zeros, zeros])
    np.testing.assert_array_equal(again[1]["w"], trajectory[1]["w"])


def test_papa_pair_half_named_equals_stacked():
    m = 5
    params, grads = _random_params(m), _random_grads(4, m)

    def make(axis_name):
        return optax_wa.papa(
            optax.sgd(0.1, momentum=0.9),
            period=2,
            combine="pair_half",
            axis_name=axis_name,
        )

    stacked_opt = make(None)
    stacked, _ = _run(stacked_opt, params, grads, update=jax.jit(stacked_opt.update))
    named_opt = make("members")
    step = jax.jit(jax.vmap(named_opt.update, axis_name="members"))
    state, named = jax.vmap(named_opt.init)(params), params
    for g in grads:
        updates, state = step(g, state, named)
        named = optax.apply_updates(named, updates)
    chex.assert_trees_all_close(stacked[-1], named, rtol=1e-6, atol=1e-6)
    assert not np.allclose(stacked[-1]["w"][0], stacked[-1]["w"][1])


def test_papa_all_is_lookaround():
    params, grads = _random_params(4), _random_grads(6, 4)
    inner = optax.sgd(0.1, momentum=0.9)
    every = optax_wa.sync_schedule(3, steps_per_epoch=4)
    papa_all, _ = _run(optax_wa.papa(inner, alpha=0.0, period=every), params, grads)
    look, _ = _run(optax_wa.lookaround(inner, sync_period=every), params, grads)
    for a, b in zip(papa_all, look):
        chex.assert_trees_all_equal(a, b)


def test_bad_combine_is_rejected():
    with pytest.raises(ValueError, match="combine"):
        optax_wa.papa(optax.sgd(0.1), combine="pair_75")


# --- bfloat16: one rounding at a sync -----------------------------------------


@pytest.mark.parametrize("m", [2, 4, 8, 64])
@pytest.mark.parametrize("which", ["lookaround", "papa"])
def test_bf16_sync_makes_members_bitwise_equal_to_the_rounded_mean(m, which):
    key1, key2 = jax.random.split(jax.random.key(m))
    params = {"w": jax.random.normal(key1, (m, 32, 8)).astype(jnp.bfloat16)}
    grads = {"w": jax.random.normal(key2, (m, 32, 8)).astype(jnp.bfloat16)}
    inner = optax.sgd(0.1)
    if which == "lookaround":
        opt = optax_wa.lookaround(inner, sync_period=1)
    else:
        opt = optax_wa.papa(inner, alpha=0.0, period=1)
    # Eager, so that the inner update is rounded to bfloat16 as the reference's
    # (under jit XLA may keep it in float32: excess precision).
    updates, _ = opt.update(grads, opt.init(params), params)
    new = optax.apply_updates(params, updates)["w"]
    assert new.dtype == jnp.bfloat16
    per = members.per_member(inner)
    inner_u, _ = per.update(grads, per.init(params))
    exact = np.asarray(params["w"], np.float64) + np.asarray(inner_u["w"], np.float64)
    want = jnp.asarray(exact.mean(0), jnp.float32).astype(jnp.bfloat16)
    got = np.asarray(new).view(np.uint16)
    assert (got == got[0]).all(), "members differ after a sync"
    np.testing.assert_array_equal(got[0], np.asarray(want).view(np.uint16))
    # Under jit too, members are bitwise equal.
    updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
    jitted = np.asarray(optax.apply_updates(params, updates)["w"]).view(np.uint16)
    assert (jitted == jitted[0]).all(), "members differ after a jitted sync"


# --- stacked == named (vmap) == named (shard_map) ---------------------------

_FACTORIES = {
    "lookaround": lambda axis_name: optax_wa.lookaround(
        optax.sgd(0.1, momentum=0.9),
        sync_period=2,
        axis_name=axis_name,
        state_policy="average",
    ),
    "papa": lambda axis_name: optax_wa.papa(
        optax.adam(0.1), alpha=0.8, period=2, axis_name=axis_name
    ),
}


def _stacked_run(name, params, grads):
    opt = _FACTORIES[name](None)
    trajectory, _ = _run(opt, params, grads, update=jax.jit(opt.update))
    return trajectory[-1]


def _named_run(name, params, grads, axis_name, update_wrapper, mesh=None):
    opt = _FACTORIES[name](axis_name)
    state = jax.jit(jax.vmap(opt.init))(params)
    if mesh is not None:
        state = members.shard_members(state, mesh, "devices")
    step = update_wrapper(opt)
    for g in grads:
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("name", sorted(_FACTORIES))
def test_stacked_equals_named_vmap(name):
    params, grads = _random_params(4), _random_grads(5, 4)
    stacked = _stacked_run(name, params, grads)
    named = _named_run(
        name,
        params,
        grads,
        "members",
        lambda opt: jax.jit(jax.vmap(opt.update, axis_name="members")),
    )
    chex.assert_trees_all_close(stacked, named, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(_FACTORIES))
def test_stacked_equals_named_shard_map_two_members_per_device(name):
    m = 16
    mesh = jax.make_mesh((8,), ("devices",))
    params, grads = _random_params(m), _random_grads(5, m)
    stacked = _stacked_run(name, params, grads)

    def wrapper(opt):
        # Two members per device: vmap inside shard_map; collectives span the
        # device axis and the vmapped axis.
        local = jax.vmap(opt.update, axis_name="local")
        sharded = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=P("devices"),
            out_specs=P("devices"),
            check_vma=False,
        )
        return jax.jit(sharded)

    with jax.set_mesh(mesh):
        params = members.shard_members(params, mesh, "devices")
        grads = [members.shard_members(g, mesh, "devices") for g in grads]
        named = _named_run(name, params, grads, ("devices", "local"), wrapper, mesh)
    chex.assert_trees_all_close(stacked, named, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["lookaround", "papa"])
def test_stacked_sharded_equals_unsharded(name):
    mesh = jax.make_mesh((8,), ("members",))
    params, grads = _random_params(8), _random_grads(5, 8)
    opt = _FACTORIES[name](None)
    want = _stacked_run(name, params, grads)
    with jax.set_mesh(mesh):
        sharded_params = members.shard_members(params, mesh)
        sharded_grads = [members.shard_members(g, mesh) for g in grads]
        got, _ = _run(opt, sharded_params, sharded_grads, update=jax.jit(opt.update))
    chex.assert_trees_all_close(want, got[-1], rtol=1e-6, atol=1e-6)
    assert got[-1]["w"].sharding.spec[0] == "members"


# --- bad input --------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_lookaround_rejects_bad_sync_period(value):
    with pytest.raises(ValueError, match="sync_period"):
        optax_wa.lookaround(optax.sgd(0.1), sync_period=value)


def test_lookaround_rejects_bad_state_policy():
    with pytest.raises(ValueError, match="state_policy"):
        optax_wa.lookaround(optax.sgd(0.1), state_policy="mean")


@pytest.mark.parametrize("value", [0, -3, 2.0])
def test_papa_rejects_bad_period(value):
    with pytest.raises(ValueError, match="period"):
        optax_wa.papa(optax.sgd(0.1), period=value)


@pytest.mark.parametrize(
    "value", [-0.1, 1.01, float("nan"), True, np.bool_(False), "0.5", np.ones(2)]
)
def test_papa_rejects_alpha_outside_unit_interval(value):
    with pytest.raises(ValueError, match="alpha"):
        optax_wa.papa(optax.sgd(0.1), alpha=value)


@pytest.mark.parametrize("factory", [optax_wa.lookaround, optax_wa.papa])
def test_member_axis_sizes_that_differ_are_rejected(factory):
    opt = factory(optax.sgd(0.1))
    with pytest.raises(ValueError, match="disagree"):
        opt.init({"w": jnp.zeros((3, 2)), "b": jnp.zeros((2, 2))})


@pytest.mark.parametrize("factory", [optax_wa.lookaround, optax_wa.papa])
def test_member_axis_of_size_zero_is_rejected(factory):
    opt = factory(optax.sgd(0.1))
    with pytest.raises(ValueError, match="size 0"):
        opt.init({"w": jnp.zeros((0, 2))})


@pytest.mark.parametrize("factory", [optax_wa.lookaround, optax_wa.papa])
def test_update_without_params_is_rejected(factory):
    opt = factory(optax.sgd(0.1))
    params = {"w": jnp.zeros((2, 2))}
    with pytest.raises(ValueError, match="params"):
        opt.update(params, opt.init(params))


def test_lookaround_inside_chain_as_last_element():
    # Clipping before the per-member optimizer: lookaround last in the chain.
    opt = optax.chain(
        optax.clip(1.0), optax_wa.lookaround(optax.sgd(1.0), sync_period=1)
    )
    params = {"w": jnp.array([0.0, 0.0])}
    trajectory, _ = _run(opt, params, [{"w": jnp.array([5.0, -0.5])}])
    np.testing.assert_allclose(trajectory[0]["w"], [-0.25, -0.25])


# --- one code path: the average under lax.cond --------------------------------


@pytest.mark.parametrize("factory", [optax_wa.lookaround, optax_wa.papa])
def test_a_costly_inner_update_runs_once_and_the_sync_is_a_cond(factory):
    """The inner update (here one that evaluates gradients) is traced once."""
    calls = []

    def grad_fn(p):
        calls.append(1)
        return jax.grad(lambda q: jnp.sum(q["w"] ** 2) + jnp.sum(q["b"] ** 2))(p)

    opt = factory(optax_wa.ssam(optax.sgd(0.1), rho=0.05), **_PERIOD_TWO[factory])
    params = _random_params(2)
    jaxpr = jax.make_jaxpr(lambda g, s, p: opt.update(g, s, p, grad_fn=grad_fn))(
        _random_grads(1, 2)[0], opt.init(params), params
    )
    assert len(calls) == 1
    assert "cond[" in str(jaxpr)


@pytest.mark.parametrize("factory", [optax_wa.lookaround, optax_wa.papa])
def test_donated_inner_state_is_updated_in_place(factory):
    """No copy of a parameter-sized buffer in the compiled, donated step."""
    opt = factory(optax.sgd(0.1, momentum=0.9))
    params = {"w": jnp.ones((4, 64, 10)), "b": jnp.ones((4, 96))}

    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    hlo = (
        jax.jit(step, donate_argnums=(0, 1))
        .lower(params, opt.init(params), params)
        .compile()
        .as_text()
    )
    copied_shapes = re.findall(r"= (\S+) copy\(", hlo)
    assert not [s for s in copied_shapes if s.startswith("f32[4,")], copied_shapes


@pytest.mark.parametrize(
    "opt",
    [
        optax_wa.lookaround(optax.sgd(0.1, momentum=0.9), sync_period=5),
        optax_wa.papa(
            optax.sgd(0.1), alpha=optax.linear_schedule(0.5, 0.9, 20), period=3
        ),
        optax_wa.papa(optax.sgd(0.1), period=3, combine="pair_half"),
    ],
    ids=["lookaround", "papa", "papa-2"],
)
def test_per_tensor_kernels_read_the_sync_flag_not_the_count(opt, hlo_computations):
    """The schedule's arithmetic is compiled once, not into every tensor's
    kernel: no fused computation over a member-stacked tensor computes an
    integer (the count, or its remainder); the one integer such a kernel
    reads is the run-time offset of its cut out of the mean's buffer."""
    params = {f"t{i}": jnp.ones((4, 3 + i, 5)) for i in range(5)}
    hlo = (
        jax.jit(opt.update).lower(params, opt.init(params), params).compile().as_text()
    )
    computations = hlo_computations(hlo)
    shapes = {f"f32[4,{3 + i},5]" for i in range(len(params))}
    per_tensor = [(n, body) for n, (out, body) in computations.items() if out in shapes]
    assert len(per_tensor) >= len(params), computations  # the check sees the kernels
    for name, body in per_tensor:
        ints = re.findall(r"= [su]32\[\S*\] (\S+)\(", body)
        assert set(ints) <= {"parameter", "constant"}, (name, ints)
        int_values = re.findall(r"(%\S+) = s32\[\] (?:parameter|constant)", body)
        for param in int_values:  # read only as a dynamic-slice start
            uses = re.findall(rf"= \S+ (\S+)\([^\n]*{re.escape(param)}[,)]", body)
            assert set(uses) == {"dynamic-slice"}, (name, uses)


_FLAT_CASES = [
    lambda: optax_wa.lookaround(optax.sgd(0.1, momentum=0.9), sync_period=2),
    lambda: optax_wa.papa(optax.sgd(0.1, momentum=0.9), alpha=0.7, period=2),
    lambda: optax_wa.papa(
        optax.sgd(0.1, momentum=0.9), period=2, combine="pair_half", seed=3
    ),
]
_FLAT_IDS = ["lookaround", "papa", "papa-2"]


@pytest.mark.parametrize("make", _FLAT_CASES, ids=_FLAT_IDS)
def test_a_tree_averages_as_its_tensors_one_by_one(make):
    """The mean (or pair mean) of a tree is taken on one flat buffer per
    dtype and cut back: every tensor comes out bitwise as when averaged
    alone, for mixed dtypes, shapes and an empty tensor."""
    specs = {
        "a": ((3, 5), jnp.float32),
        "b": ((7,), jnp.bfloat16),
        "c": ((2, 2, 3), jnp.float32),
        "d": ((6,), jnp.float16),
        "e": ((4, 0), jnp.float32),
        "f": ((1,), jnp.bfloat16),
    }
    m, steps = 3, 4
    key = jax.random.key(7)

    def normal(k, name, shape, dtype):
        return jax.random.normal(jax.random.fold_in(k, ord(name)), (m, *shape)).astype(
            dtype
        )

    params = {n: normal(key, n, *spec) for n, spec in specs.items()}
    grads = [
        {
            n: normal(jax.random.fold_in(key, t + 1), n, *spec)
            for n, spec in specs.items()
        }
        for t in range(steps)
    ]
    opt = make()
    whole, _ = _run(opt, params, grads, jax.jit(opt.update))
    for name in specs:
        alone, _ = _run(
            opt,
            {name: params[name]},
            [{name: g[name]} for g in grads],
            jax.jit(opt.update),
        )
        for t in range(steps):
            np.testing.assert_array_equal(whole[t][name], alone[t][name], err_msg=name)


@pytest.mark.parametrize("make", _FLAT_CASES, ids=_FLAT_IDS)
def test_compiled_kernels_do_not_grow_with_the_tensor_count(make, hlo_computations):
    """XLA:CPU compiles each distinct computation once: the tensors' cuts out
    of the mean's buffer start at run-time offsets, so four copies of a
    3-tensor tree compile no new kernel (at constant offsets, one per tensor)."""
    shapes = [(3, 3, 2, 4), (5, 4), (6,)]

    def kernels(copies):
        params = {
            f"t{i}": jax.random.normal(jax.random.key(i), (4, *shape))
            for i, shape in enumerate(shapes * copies)
        }
        opt = make()
        lowered = jax.jit(opt.update).lower(params, opt.init(params), params)
        computations = hlo_computations(lowered.compile().as_text(), True)
        return {body for name, (_, body) in computations.items() if name != "ENTRY"}

    one, four = kernels(1), kernels(4)
    assert len(one) >= 2 * len(shapes)  # the check sees per-shape kernels
    assert len(four) <= len(one), len(four)


_PERIOD_TWO = {
    optax_wa.lookaround: {"sync_period": 2},
    optax_wa.papa: {"period": 2, "alpha": 0.5},
}


def test_papa_pull_waits_for_the_sync_step():
    alpha = 0.75
    opt = optax_wa.papa(optax.sgd(0.0), alpha=alpha, period=2)
    params = {"w": jnp.array([[0.0, 2.0], [4.0, 10.0]])}
    grads = [jax.tree.map(jnp.zeros_like, params)] * 2
    trajectory, _ = _run(opt, params, grads)
    np.testing.assert_array_equal(trajectory[0]["w"], params["w"])  # no pull yet
    mean = params["w"].mean(0)
    want = alpha * params["w"] + (1 - alpha) * mean
    np.testing.assert_allclose(trajectory[1]["w"], want, rtol=1e-7)


# --- optax conventions: inject_hyperparams, tree_map_params --------------------


def test_inject_hyperparams_natural_forms_equal_plain():
    params, grads = _random_params(3), _random_grads(6, 3)
    inner = optax.sgd(0.1, momentum=0.9)
    cases = [
        (optax_wa.lookaround, dict(inner=inner, sync_period=5)),
        (optax_wa.papa, dict(inner=inner, alpha=0.9)),
        (optax_wa.papa, dict(inner=inner, alpha=0.5, period=2)),
    ]
    for factory, kwargs in cases:
        plain = factory(**kwargs)
        injected = optax.inject_hyperparams(factory)(**kwargs)
        want, _ = _run(plain, params, grads, update=jax.jit(plain.update))
        got, state = _run(injected, params, grads, update=jax.jit(injected.update))
        for a, b in zip(want, got):
            chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-6)
    # The injected period is a live hyperparameter.
    opt = optax.inject_hyperparams(optax_wa.lookaround)(inner=inner, sync_period=5)
    state = opt.init(params)
    state.hyperparams["sync_period"] = jnp.asarray(1)
    updates, _ = jax.jit(opt.update)(grads[0], state, params)
    new = optax.apply_updates(params, updates)
    chex.assert_trees_all_close(new, members.member_mean(new), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("value, same_as", [(1.7, 1.0), (-0.4, 0.0)])
def test_alpha_outside_unit_interval_at_run_time_is_clipped(value, same_as):
    params, grads = _random_params(3), _random_grads(4, 3)
    inner = optax.sgd(0.1)
    scheduled = optax_wa.papa(inner, alpha=lambda count: value, period=2)
    got, _ = _run(scheduled, params, grads, update=jax.jit(scheduled.update))
    want, _ = _run(optax_wa.papa(inner, alpha=same_as, period=2), params, grads)
    chex.assert_trees_all_close(got[-1], want[-1], rtol=1e-6, atol=1e-6)
    injected = optax.inject_hyperparams(optax_wa.papa)(inner=inner, alpha=0.5, period=2)
    state = injected.init(params)
    state.hyperparams["alpha"] = jnp.asarray(value)
    p = params
    for g in grads:
        updates, state = jax.jit(injected.update)(g, state, p)
        state.hyperparams["alpha"] = jnp.asarray(value)
        p = optax.apply_updates(p, updates)
    chex.assert_trees_all_close(p, want[-1], rtol=1e-6, atol=1e-6)
    assert float(optax_wa.sync_weight(value, 2, 2)) == same_as


@pytest.mark.parametrize(
    "factory",
    [
        lambda: optax_wa.lookaround(optax.adam(0.1), sync_period=2),
        lambda: optax_wa.papa(optax.sgd(0.1, momentum=0.9), alpha=0.8),
        lambda: members.per_member(optax.adam(0.1)),
    ],
)
def test_tree_map_params_builds_a_sharding_tree_for_the_state(factory):
    opt = factory()
    mesh = jax.make_mesh((8,), ("members",))
    params = _random_params(8)
    state = opt.init(params)
    split = jax.sharding.NamedSharding(mesh, P("members"))
    replicated = jax.sharding.NamedSharding(mesh, P())
    param_shardings = jax.tree.map(lambda _: split, params)
    shardings = optax.tree_utils.tree_map_params(
        opt,
        lambda _, sharding: sharding,
        state,
        param_shardings,
        transform_non_params=lambda _: replicated,
    )
    placed = jax.device_put(state, shardings)
    chex.assert_trees_all_equal(placed, state)
    # Param-shaped leaves (momentum, Adam moments) got the params' sharding.
    moments = [
        leaf for leaf in jax.tree.leaves(placed) if leaf.shape in {(8, 3, 2), (8, 2)}
    ]
    assert moments and all(leaf.sharding == split for leaf in moments)
    counts = [leaf for leaf in jax.tree.leaves(placed) if leaf.ndim <= 1]
    assert counts and all(leaf.sharding == replicated for leaf in counts)


@pytest.mark.parametrize("factory", [optax_wa.lookaround, optax_wa.papa])
def test_integer_params_are_rejected(factory):
    opt = factory(optax.sgd(0.1))
    params = {"w": jnp.array([[1.0], [2.0]]), "n": jnp.array([[1], [2]], jnp.int32)}
    with pytest.raises(TypeError, match=r"\['n'\].*int32"):
        opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)


@pytest.mark.parametrize("value", [0, "5", 2.5, True, (2,)])
def test_bad_sync_period_names_the_argument(value):
    with pytest.raises(ValueError, match="sync_period"):
        optax_wa.lookaround(optax.sgd(0.1), sync_period=value)


def test_cifar_papa_recipe_with_warmup_stays_finite_and_pulls_bn_stats_with_params():
    pytest.importorskip("ml_collections")  # the examples extra
    from examples.cifar.configs import default
    from examples.trainer import methods

    config = default.get_config()
    config.method = "papa"
    config.optimizer.warmup_steps = 3  # lr(0) = 0
    config.papa.period = 2
    method = methods.parse_method("papa")
    schedule = methods.learning_rate_schedule(config, total_steps=12)
    assert float(schedule(0)) == 0.0
    tx = methods.make_optimizer(config, method, schedule, steps_per_epoch=5)
    sync = methods.model_state_sync(config, method, schedule, steps_per_epoch=5)
    params, grads = _random_params(3), _random_grads(12, 3)
    stats = {"mean": jax.random.normal(jax.random.key(9), (3, 2))}
    state = tx.init(params)
    for g in grads:
        updates, state = jax.jit(tx.update)(g, state, params)
        params = optax.apply_updates(params, updates)
        before = stats
        stats = jax.jit(sync)(stats, state.count)
        chex.assert_tree_all_finite((params, stats))
        c = int(state.count)
        pulled = (c - 1) % 5 % 2 == 0  # after updates 1, 3, 5 of every epoch
        lr_next = float(schedule(c))
        a = 1 - lr_next / config.optimizer.learning_rate * (1 - config.papa.alpha)
        want = (
            before["mean"]
            if not pulled
            else (a * before["mean"] + (1 - a) * before["mean"].mean(0))
        )
        np.testing.assert_allclose(stats["mean"], want, rtol=1e-6, atol=1e-7)


def test_inject_hyperparams_with_a_sync_schedule_needs_static_args():
    inner = optax.sgd(0.1)
    every = optax_wa.sync_schedule(2, steps_per_epoch=3)
    params, grads = _random_params(3), _random_grads(5, 3)
    with pytest.raises(ValueError, match="static_args"):
        optax.inject_hyperparams(optax_wa.papa)(inner=inner, period=every).init(params)
    injected = optax.inject_hyperparams(optax_wa.papa, static_args="period")(
        inner=inner, alpha=0.5, period=every
    )
    plain = optax_wa.papa(inner, alpha=0.5, period=every)
    want, _ = _run(plain, params, grads)
    got, _ = _run(injected, params, grads, update=jax.jit(injected.update))
    for a, b in zip(want, got):
        chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-6)
