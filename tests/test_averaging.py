"""Analytic and equivalence tests of lookaround and papa."""

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


@pytest.mark.parametrize("control_flow", ["cond", "select"])
def test_lookaround_hand_traced_two_syncs(control_flow):
    # Two members, SGD lr=1, k=2:
    # (1, 3) -g(1,-1)-> (0, 4) -g(1,-1)-> (-1, 5) -sync-> (2, 2)
    #        -g(1,.5)-> (1, 1.5) -g(-1,.5)-> (2, 1) -sync-> (1.5, 1.5)
    opt = optax_wa.lookaround(optax.sgd(1.0), sync_period=2, control_flow=control_flow)
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


def test_papa_lr_scaled_alpha():
    schedule = optax.linear_schedule(0.2, 0.0, 10)
    alpha = optax_wa.papa_lr_scaled_alpha(0.99, schedule)
    np.testing.assert_allclose(alpha(0), 0.99, rtol=1e-6)
    np.testing.assert_allclose(alpha(5), 1 - 0.01 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(alpha(10), 1.0, rtol=1e-6)


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
    "lookaround_select": lambda axis_name: optax_wa.lookaround(
        optax.sgd(0.1, momentum=0.9),
        sync_period=2,
        axis_name=axis_name,
        state_policy="average",
        control_flow="select",
    ),
    "papa_select": lambda axis_name: optax_wa.papa(
        optax.adam(0.1),
        alpha=0.8,
        period=2,
        axis_name=axis_name,
        control_flow="select",
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


@pytest.mark.parametrize("name", ["lookaround", "lookaround_select"])
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


@pytest.mark.parametrize("value", [-0.1, 1.01, float("nan")])
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


# --- recompute: two ways to feed the averaging branch ------------------------

_RECOMPUTE_FACTORIES = {
    "lookaround_keep": lambda **kw: optax_wa.lookaround(
        optax.adam(0.1), sync_period=3, **kw
    ),
    "lookaround_average": lambda **kw: optax_wa.lookaround(
        optax.sgd(0.1, momentum=0.9), sync_period=2, state_policy="average", **kw
    ),
    "lookaround_reset": lambda **kw: optax_wa.lookaround(
        optax.adam(0.1), sync_period=2, state_policy="reset", **kw
    ),
    "papa": lambda **kw: optax_wa.papa(optax.adam(0.1), alpha=0.7, period=3, **kw),
}


@pytest.mark.parametrize("name", sorted(_RECOMPUTE_FACTORIES))
def test_recompute_true_equals_false(name):
    params, grads = _random_params(3), _random_grads(7, 3)
    runs = {}
    for recompute in (True, False):
        opt = _RECOMPUTE_FACTORIES[name](recompute=recompute)
        runs[recompute] = _run(opt, params, grads, update=jax.jit(opt.update))
    for a, b in zip(runs[True][0], runs[False][0]):
        chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(runs[True][1], runs[False][1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("recompute", [True, False])
def test_recompute_named_vmap_equals_stacked(recompute):
    params, grads = _random_params(4), _random_grads(5, 4)

    def make(axis_name):
        return optax_wa.lookaround(
            optax.adam(0.1), sync_period=2, axis_name=axis_name, recompute=recompute
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


@pytest.mark.parametrize("factory", [optax_wa.lookaround, optax_wa.papa])
@pytest.mark.parametrize("recompute", [None, True, False])
def test_recompute_decides_how_often_a_costly_inner_update_runs(factory, recompute):
    """The default runs an inner update that takes a callable (grad_fn) once."""
    calls = []

    def grad_fn(p):
        calls.append(1)
        return jax.grad(lambda q: jnp.sum(q["w"] ** 2) + jnp.sum(q["b"] ** 2))(p)

    opt = factory(optax_wa.ssam(optax.sgd(0.1), rho=0.05), recompute=recompute)
    params = _random_params(2)
    jax.make_jaxpr(lambda g, s, p: opt.update(g, s, p, grad_fn=grad_fn))(
        _random_grads(1, 2)[0], opt.init(params), params
    )
    assert len(calls) == (2 if recompute else 1)


@pytest.mark.parametrize("factory", [optax_wa.lookaround, optax_wa.papa])
@pytest.mark.parametrize("recompute", [True, False])
def test_donated_inner_state_is_updated_in_place(factory, recompute):
    """No copy of a parameter-sized buffer in the compiled, donated step."""
    opt = factory(optax.sgd(0.1, momentum=0.9), recompute=recompute)
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


@pytest.mark.parametrize("factory", [optax_wa.lookaround, optax_wa.papa])
@pytest.mark.parametrize("value", [1, "yes", 0.0])
def test_bad_recompute_is_rejected(factory, value):
    with pytest.raises(ValueError, match="recompute"):
        factory(optax.sgd(0.1), recompute=value)


_PERIOD_TWO = {
    optax_wa.lookaround: {"sync_period": 2},
    optax_wa.papa: {"period": 2, "alpha": 0.5},
}


@pytest.mark.parametrize("factory", [optax_wa.lookaround, optax_wa.papa])
def test_recompute_with_a_random_inner_optimizer_draws_the_same_noise(factory):
    """The branch's rerun of a noisy inner update uses the same key as the step."""
    inner = optax.chain(optax.add_noise(0.1, 0.0, seed=3), optax.sgd(0.1))
    params, grads = _random_params(3), _random_grads(6, 3)
    runs = {}
    for recompute in (True, False):
        opt = factory(inner, recompute=recompute, **_PERIOD_TWO[factory])
        runs[recompute] = _run(opt, params, grads, update=jax.jit(opt.update))[0]
    for a, b in zip(runs[True], runs[False]):
        chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-6)
    # The noise is really there: a noise-free run differs.
    quiet = factory(optax.sgd(0.1), recompute=True, **_PERIOD_TWO[factory])
    plain = _run(quiet, params, grads)[0]
    assert float(jnp.abs(plain[-1]["w"] - runs[True][-1]["w"]).max()) > 1e-3


# --- control_flow="select": the mean fused into every step, no lax.cond -----


@pytest.mark.parametrize("name", sorted(_RECOMPUTE_FACTORIES))
def test_select_equals_cond(name):
    params, grads = _random_params(3), _random_grads(7, 3)
    runs = {}
    for flow in ("cond", "select"):
        opt = _RECOMPUTE_FACTORIES[name](control_flow=flow)
        runs[flow] = _run(opt, params, grads, update=jax.jit(opt.update))
    for a, b in zip(runs["cond"][0], runs["select"][0]):
        chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(
        runs["cond"][1], runs["select"][1], rtol=1e-6, atol=1e-6
    )


def test_select_papa_pull_is_exact():
    alpha = 0.75
    opt = optax_wa.papa(optax.sgd(0.0), alpha=alpha, period=2, control_flow="select")
    params = {"w": jnp.array([[0.0, 2.0], [4.0, 10.0]])}
    grads = [jax.tree.map(jnp.zeros_like, params)] * 2
    trajectory, _ = _run(opt, params, grads)
    np.testing.assert_array_equal(trajectory[0]["w"], params["w"])  # no pull yet
    mean = params["w"].mean(0)
    want = alpha * params["w"] + (1 - alpha) * mean
    np.testing.assert_allclose(trajectory[1]["w"], want, rtol=1e-7)


@pytest.mark.parametrize("factory", [optax_wa.lookaround, optax_wa.papa])
def test_select_has_no_control_flow_and_runs_the_inner_update_once(factory):
    calls = []

    def grad_fn(p):
        calls.append(1)
        return jax.grad(lambda q: jnp.sum(q["w"] ** 2) + jnp.sum(q["b"] ** 2))(p)

    opt = factory(
        optax_wa.ssam(optax.sgd(0.1), rho=0.05),
        control_flow="select",
        **_PERIOD_TWO[factory],
    )
    params = _random_params(2)
    jaxpr = jax.make_jaxpr(lambda g, s, p: opt.update(g, s, p, grad_fn=grad_fn))(
        _random_grads(1, 2)[0], opt.init(params), params
    )
    assert len(calls) == 1
    assert "cond[" not in str(jaxpr)
    cond_opt = factory(optax.sgd(0.1), **_PERIOD_TWO[factory])
    cond_jaxpr = jax.make_jaxpr(cond_opt.update)(
        _random_grads(1, 2)[0], cond_opt.init(params), params
    )
    assert "cond[" in str(cond_jaxpr)  # the check above can fail


@pytest.mark.parametrize("factory", [optax_wa.lookaround, optax_wa.papa])
def test_bad_control_flow_is_rejected(factory):
    with pytest.raises(ValueError, match="control_flow"):
        factory(optax.sgd(0.1), control_flow="while")
    with pytest.raises(ValueError, match="recompute"):
        factory(optax.sgd(0.1), control_flow="select", recompute=True)
