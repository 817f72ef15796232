"""The contract every transformation of the library passes.

A method joins the suite with one entry in ``CASES``. ``Case`` fields:

* ``make``: ``make(**hyperparams) -> optax.GradientTransformationExtraArgs``.
* ``hyperparams``: the arguments, passed to ``make`` directly and through
  ``optax.inject_hyperparams`` (the two must agree); the numeric ones become
  injected hyperparameters.
* ``ensemble``: True when params carry a leading member axis (stacked mode).
  The contract params have 8 members (leaves ``(8, 4, 3)`` and ``(8, 3)``);
  for non-ensemble methods the same arrays are plain params.
* ``extra_args``: ``extra_args(params) -> dict`` of keyword extras the update
  needs (e.g. ``{"grad_fn": contract_grad_fn}``); the default needs none.
  Callable extras are static arguments of the jitted update.
* ``wide_updates``: True when updates of bfloat16/float16 params are float32
  (the averaging methods, so that ``apply_updates`` rounds a sync once).

The suite checks: ``jax.jit`` equals eager; unknown extra args are ignored;
``inject_hyperparams`` equals the plain factory; bf16 params stay bf16;
``optax.MultiSteps`` with every micro-batch repeated equals the plain run;
state and update shardings are stable on an 8-device mesh; ``init`` traces
on ``jax.ShapeDtypeStruct``; the same inputs give bit-identical outputs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_wa

NUM_MEMBERS = 8


def contract_loss(params):
    """A smooth, separable (hence per-member) loss used by the suite."""
    return sum(
        jnp.sum(0.5 * x.astype(jnp.float32) ** 2 + jnp.sin(x.astype(jnp.float32)))
        for x in jax.tree.leaves(params)
    )


def contract_grad_fn(params, *args):
    """Gradient of ``contract_loss``, cast back to the params' dtypes."""
    grads = jax.grad(contract_loss)(params)
    return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)


@dataclasses.dataclass(frozen=True)
class Case:
    make: Callable[..., optax.GradientTransformationExtraArgs]
    hyperparams: dict[str, Any]
    ensemble: bool = True
    extra_args: Callable[[Any], dict] = lambda params: {}
    wide_updates: bool = False


CASES: dict[str, Case] = {
    # The averaging methods through their real factories (inject_hyperparams
    # sees the real signatures: an integer period, the inner optimizer).
    "lookaround": Case(
        make=optax_wa.lookaround,
        hyperparams={"inner": optax.sgd(0.1, momentum=0.9), "sync_period": 2},
        wide_updates=True,
    ),
    "lookaround_average_state": Case(
        make=optax_wa.lookaround,
        hyperparams={
            "inner": optax.adam(0.1),
            "sync_period": 2,
            "state_policy": "average",
        },
        wide_updates=True,
    ),
    "papa": Case(
        make=optax_wa.papa,
        hyperparams={"inner": optax.sgd(0.1, momentum=0.9), "alpha": 0.9, "period": 2},
        wide_updates=True,
    ),
    "papa_pair_half": Case(
        make=optax_wa.papa,
        hyperparams={
            "inner": optax.sgd(0.1, momentum=0.9),
            "period": 2,
            "combine": "pair_half",
        },
        wide_updates=True,
    ),
    # The real factories under their real signatures (only the inner optimizer
    # is bound): inject_hyperparams injects rho, eps, adaptive_eta (max_scale).
    "sharpness_aware": Case(
        make=functools.partial(optax_wa.sharpness_aware, optax.sgd(0.1, momentum=0.9)),
        hyperparams={"rho": 0.05},
        ensemble=False,
        extra_args=lambda params: {"grad_fn": contract_grad_fn},
    ),
    "sharpness_aware_no_info": Case(
        make=functools.partial(
            optax_wa.sharpness_aware, optax.sgd(0.1, momentum=0.9), record_info=False
        ),
        hyperparams={"rho": 0.05},
        ensemble=False,
        extra_args=lambda params: {"grad_fn": contract_grad_fn},
    ),
    "ssam": Case(
        make=functools.partial(optax_wa.ssam, optax.sgd(0.1)),
        hyperparams={"rho": 0.05},
        ensemble=False,
        extra_args=lambda params: {"grad_fn": contract_grad_fn},
    ),
    "asam": Case(
        make=functools.partial(optax_wa.sharpness_aware, optax.sgd(0.1), adaptive=True),
        hyperparams={"rho": 0.5},
        ensemble=False,
        extra_args=lambda params: {"grad_fn": contract_grad_fn},
    ),
    "ssam_asam_capped": Case(
        make=functools.partial(
            optax_wa.ssam, optax.sgd(0.1), perturbation="usam", adaptive=True
        ),
        hyperparams={"rho": 0.5, "adaptive_eta": 0.01, "max_scale": 1.0},
        ensemble=False,
        extra_args=lambda params: {"grad_fn": contract_grad_fn},
    ),
    "lookaround_ssam": Case(
        make=lambda learning_rate: optax_wa.lookaround(
            optax_wa.ssam(optax.sgd(learning_rate, momentum=0.9), rho=0.05),
            sync_period=2,
        ),
        hyperparams={"learning_rate": 0.1},
        extra_args=lambda params: {"grad_fn": contract_grad_fn},
        wide_updates=True,
    ),
    "wash": Case(
        make=lambda learning_rate: optax_wa.wash(
            optax.sgd(learning_rate, momentum=0.9),
            shuffle_prob=0.1,
            layer_probs="constant",
            seed=0,
        ),
        hyperparams={"learning_rate": 0.1},
    ),
    "wash_opt_state": Case(
        make=lambda learning_rate: optax_wa.wash(
            optax.adam(learning_rate),
            shuffle_prob=0.1,
            layer_probs="constant",
            shuffle_opt_state=True,
            seed=0,
        ),
        hyperparams={"learning_rate": 0.1},
    ),
    "freeze_until": Case(
        make=lambda learning_rate: optax_wa.freeze_until(
            2, {"w": False, "b": True}, inner=optax.sgd(learning_rate, momentum=0.9)
        ),
        hyperparams={"learning_rate": 0.1},
        ensemble=False,
    ),
    "slimmable_grad_stats": Case(
        make=lambda learning_rate: optax.chain(
            optax_wa.slimmable.slimmable_grad_stats(
                {
                    "w": optax_wa.slimmable.SlicedAxes((1, 2)),
                    "b": optax_wa.slimmable.SlicedAxes((1,)),
                },
                min_width=0.5,
            ),
            optax.sgd(learning_rate),
        ),
        hyperparams={"learning_rate": 0.1},
        ensemble=False,
    ),
}


def _params(dtype=jnp.float32, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "w": jax.random.normal(k1, (NUM_MEMBERS, 4, 3)).astype(dtype),
        "b": jax.random.normal(k2, (NUM_MEMBERS, 3)).astype(dtype),
    }


def _grads(step, dtype=jnp.float32):
    return jax.tree.map(lambda x: 0.5 * x, _params(dtype, seed=100 + step))


def _jit(update):
    """``jax.jit(update)`` with callable extra args (e.g. ``grad_fn``) static."""
    cache = {}

    def call(grads, state, params, **extra):
        static = tuple(sorted(k for k, v in extra.items() if callable(v)))
        if static not in cache:
            cache[static] = jax.jit(update, static_argnames=static)
        return cache[static](grads, state, params, **extra)

    return call


def _run(opt, case, params, num_steps=4, grads_fn=_grads, update=None):
    """Runs ``num_steps`` updates; returns the final params and all updates."""
    update = update or opt.update
    state = opt.init(params)
    all_updates = []
    for step in range(num_steps):
        grads = grads_fn(step, jax.tree.leaves(params)[0].dtype)
        updates, state = update(grads, state, params, **case.extra_args(params))
        params = optax.apply_updates(params, updates)
        all_updates.append(updates)
    return params, all_updates


@pytest.fixture(params=sorted(CASES), ids=sorted(CASES))
def case(request):
    return CASES[request.param]


def _opt(case):
    return case.make(**case.hyperparams)


def test_is_gradient_transformation_extra_args(case):
    assert isinstance(_opt(case), optax.GradientTransformationExtraArgs)


def test_jit_equals_eager(case):
    opt = _opt(case)
    eager, _ = _run(opt, case, _params())
    jitted, _ = _run(opt, case, _params(), update=_jit(opt.update))
    chex.assert_tree_all_finite(jitted)
    chex.assert_trees_all_close(eager, jitted, rtol=1e-5, atol=1e-6)


def test_unknown_extra_args_are_ignored(case):
    opt = _opt(case)
    params = _params()
    state = opt.init(params)
    grads = _grads(0)
    extra = case.extra_args(params)
    ref = opt.update(grads, state, params, **extra)
    got = opt.update(grads, state, params, **extra, unknown_arg=3.0, other=None)
    chex.assert_trees_all_equal(ref, got)


def test_inject_hyperparams_equals_plain(case):
    plain, _ = _run(_opt(case), case, _params())
    injected_opt = optax.inject_hyperparams(case.make)(**case.hyperparams)
    injected, _ = _run(injected_opt, case, _params())
    chex.assert_trees_all_close(plain, injected, rtol=1e-6, atol=1e-6)


def test_bf16_params_stay_bf16(case):
    opt = _opt(case)
    params = _params(jnp.bfloat16)
    final, all_updates = _run(opt, case, params, update=_jit(opt.update))
    chex.assert_trees_all_equal_dtypes(final, params)
    want = params
    if case.wide_updates:
        want = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    for updates in all_updates:
        chex.assert_trees_all_equal_dtypes(updates, want)
    chex.assert_tree_all_finite(final)


def test_bf16_values_follow_the_float32_run(case):
    """bf16 params end where a float32 run from the same (bf16-rounded) start
    with the same gradients ends, up to bf16 rounding of 4 steps."""
    opt = _opt(case)
    got, _ = _run(opt, case, _params(jnp.bfloat16), update=_jit(opt.update))

    def f32(tree):
        return jax.tree.map(lambda x: x.astype(jnp.float32), tree)

    ref, _ = _run(
        opt,
        case,
        f32(_params(jnp.bfloat16)),
        grads_fn=lambda step, dtype: f32(_grads(step, jnp.bfloat16)),
    )
    moved = max(
        float(jnp.max(jnp.abs(r - s)))
        for r, s in zip(jax.tree.leaves(ref), jax.tree.leaves(f32(_params())))
    )
    assert moved > 0.1, "the reference run must move the params"
    chex.assert_trees_all_close(f32(got), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("scale", [1e-20, 1e19])
def test_huge_and_tiny_gradients_give_finite_updates(case, scale):
    """Gradients of 1e19 per element (their float32 squares overflow) and of
    1e-20 (their squares underflow) never make an update inf or NaN."""
    opt = _opt(case)

    def grads_fn(step, dtype):
        return jax.tree.map(lambda g: g * scale, _grads(step, dtype))

    _, all_updates = _run(opt, case, _params(), num_steps=2, grads_fn=grads_fn)
    chex.assert_tree_all_finite(all_updates)


@pytest.mark.parametrize("start", ["random", "zeros"])
def test_grad_through_one_update_is_finite(case, start):
    """``jax.grad`` of a loss of the updated params, through ``update``: finite,
    also at params = 0 (where a plain norm's square root has an inf slope)."""
    opt = _opt(case)
    params = _params()
    if start == "zeros":
        params = jax.tree.map(jnp.zeros_like, params)
    state = opt.init(params)

    def loss(p):
        updates, _ = opt.update(_grads(0), state, p, **case.extra_args(p))
        new = optax.apply_updates(p, updates)
        return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(new))

    if any(case is CASES[name] for name in CASES if name.startswith("wash")):
        # The exchange runs extra rounds in a data-dependent while loop, which
        # reverse mode cannot differentiate: a clear JAX error, never NaN.
        with pytest.raises(ValueError, match="Reverse-mode differentiation"):
            jax.grad(loss)(params)
        return
    chex.assert_tree_all_finite(jax.grad(loss)(params))


def test_multisteps_with_repeated_microbatches_equals_plain(case):
    """MultiSteps(k=2) fed each gradient twice equals the plain optimizer."""
    opt = _opt(case)
    plain, _ = _run(opt, case, _params(), num_steps=3)
    multi = optax.MultiSteps(opt, every_k_schedule=2)
    multi_final, _ = _run(
        multi,
        case,
        _params(),
        num_steps=6,
        grads_fn=lambda step, dtype: _grads(step // 2, dtype),
        update=_jit(multi.update),
    )
    chex.assert_trees_all_close(plain, multi_final, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_sharding_is_stable_on_8_device_mesh(case, axis_type):
    kind = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}[axis_type]
    mesh = jax.make_mesh((NUM_MEMBERS,), ("members",), axis_types=(kind,))
    sharding = NamedSharding(mesh, P("members"))
    opt = _opt(case)
    with jax.set_mesh(mesh):
        params = jax.device_put(_params(), sharding)
        grads = [jax.device_put(_grads(i), sharding) for i in range(2)]
        state = jax.jit(opt.init)(params)
        if axis_type == "auto":
            # Auto axes: XLA may replicate freshly made zeros; the caller places
            # the state (member-axis leaves split like params) and the update
            # must keep that placement.
            replicated = NamedSharding(mesh, P())
            state = jax.tree.map(
                lambda x: jax.device_put(
                    x, sharding if x.ndim and x.shape[0] == NUM_MEMBERS else replicated
                ),
                state,
            )
        update = _jit(opt.update)
        extra = case.extra_args(params)
        updates, new_state = update(grads[0], state, params, **extra)
        updates2, new_state2 = update(grads[1], new_state, params, **extra)
    for u, p in zip(jax.tree.leaves(updates2), jax.tree.leaves(params)):
        assert u.sharding.is_equivalent_to(p.sharding, p.ndim), (u.sharding, p.sharding)
    for before, after in zip(jax.tree.leaves(state), jax.tree.leaves(new_state2)):
        assert after.sharding.is_equivalent_to(before.sharding, before.ndim), (
            before.sharding,
            after.sharding,
        )
    # Leaves shaped like a param leaf and sharded by init keep the member split.
    param_shapes = {p.shape for p in jax.tree.leaves(params)}
    for leaf in jax.tree.leaves(new_state2):
        if leaf.shape in param_shapes and leaf.ndim > 0:
            assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), leaf.sharding


def test_init_on_shape_dtype_struct(case):
    opt = _opt(case)
    params = _params()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    abstract_state = jax.eval_shape(opt.init, abstract)
    concrete_state = opt.init(params)
    chex.assert_trees_all_equal_shapes_and_dtypes(abstract_state, concrete_state)


def test_same_inputs_give_identical_outputs(case):
    opt = _opt(case)
    first, _ = _run(opt, case, _params(), update=_jit(opt.update))
    second, _ = _run(opt, case, _params(), update=_jit(opt.update))
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ``optax.inject_hyperparams`` on the real factories, with their real
# signatures and defaults (no lambda in between): integer arguments (seeds,
# periods) are injected as integer arrays, traced under ``jax.jit``.
REAL_FACTORIES = {
    "wash": (
        optax_wa.wash,
        {"inner": optax.sgd(0.1, momentum=0.9), "shuffle_prob": 0.1},
        ("shuffle_prob",),
    ),
    "wash_options": (
        optax_wa.wash,
        {
            "inner": optax.adam(0.1),
            "shuffle_prob": 0.1,
            "interval": 2,
            "topology": "ring",
            "quantize": "bfloat16",
            "shuffle_opt_state": True,
            "seed": 3,
        },
        ("shuffle_prob",),
    ),
}


@pytest.mark.parametrize("name", sorted(REAL_FACTORIES))
def test_inject_hyperparams_on_the_real_factory(name):
    factory, kwargs, static_args = REAL_FACTORIES[name]
    case = Case(make=factory, hyperparams={})
    plain_opt = factory(**kwargs)
    plain, _ = _run(plain_opt, case, _params(), update=_jit(plain_opt.update))
    injected_opt = optax.inject_hyperparams(factory, static_args=static_args)(**kwargs)
    injected, _ = _run(injected_opt, case, _params(), update=_jit(injected_opt.update))
    chex.assert_trees_all_equal(plain, injected)
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(_params()))
    )
