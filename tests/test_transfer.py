"""Tests of optax_wa.transfer: learning-trajectory transfer."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from optax_wa import permutation as perm
from optax_wa import transfer

SIZES = (6, 16, 12, 3)
T = 4


def forward(params, x):
    """tanh MLP over the pure dict of ``MLP`` (smooth: no ties in gradients)."""
    layers = params["layers"]
    n = len(layers)
    for i in range(n):
        x = x @ layers[i]["kernel"] + layers[i]["bias"]
        if i < n - 1:
            x = jnp.tanh(x)
    return x


def loss(params, batch):
    x, y = batch
    logp = jax.nn.log_softmax(forward(params, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


grad_fn = jax.jit(jax.grad(loss))


def init_params(seed):
    """The pure dict of an ``nnx.List`` of ``nnx.Linear`` (drawn by NumPy: no compiles)."""
    rng = np.random.default_rng(seed)
    return {
        "layers": {
            i: {
                "kernel": jnp.asarray(
                    rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32
                ),
                "bias": jnp.asarray(0.1 * rng.normal(size=(b,)), jnp.float32),
            }
            for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:]))
        }
    }


def make_batches(seed, count, size=32):
    key = jax.random.key(seed)
    out = []
    for k in jax.random.split(key, count):
        kx, ky = jax.random.split(k)
        out.append(
            (
                jax.random.normal(kx, (size, SIZES[0])),
                jax.random.randint(ky, (size,), 0, SIZES[-1]),
            )
        )
    return out


@jax.jit
def sgd_step(params, batch):
    return jax.tree.map(lambda p, g: p - 0.5 * g, params, grad_fn(params, batch))


@pytest.fixture(scope="module")
def setup():
    spec = perm.mlp_spec(init_params(0))
    source_init = init_params(1)
    checkpoints = [source_init]
    for batch in make_batches(100, 3 * T):  # 3 SGD steps between checkpoints
        checkpoints.append(sgd_step(checkpoints[-1], batch))
    checkpoints = checkpoints[::3]
    assert len(checkpoints) == T + 1
    batches = make_batches(200, T)
    planted = perm.random_permutation(jax.random.key(7), spec, source_init)
    return spec, checkpoints, batches, planted


def assert_same_perms(a, b):
    chex.assert_trees_all_equal(
        jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b)
    )


@pytest.mark.parametrize("method", ["fgmt", "gmt"])
def test_planted_permutation_is_recovered_at_every_step(setup, method):
    spec, checkpoints, batches, planted = setup
    target_init = perm.apply_permutation(spec, planted, checkpoints[0])
    out = transfer.transfer_trajectory(
        checkpoints, target_init, grad_fn, batches, spec, method=method, num_steps=T
    )
    assert len(out.params) == len(out.perms) == T + 1
    for t in range(1, T + 1):
        assert_same_perms(out.perms[t], planted)
        chex.assert_trees_all_close(
            out.params[t],
            perm.apply_permutation(spec, planted, checkpoints[t]),
            atol=1e-5,
        )
    # The planted permutation is a strict improvement over the identity.
    assert not all(np.array_equal(p, np.arange(p.size)) for p in planted.values())


def test_identical_inits_give_identity(setup):
    spec, checkpoints, batches, _ = setup
    out = transfer.transfer_trajectory(
        checkpoints, checkpoints[0], grad_fn, batches, spec, num_steps=T
    )
    ident = perm.identity_permutation(spec, checkpoints[0])
    for t in range(T + 1):
        assert_same_perms(out.perms[t], ident)
        chex.assert_trees_all_close(out.params[t], checkpoints[t], atol=1e-6)


def test_naive_is_plain_displacement_on_straight_line(setup):
    spec, checkpoints, _, _ = setup
    source_init, source_final = checkpoints[0], checkpoints[-1]
    target_init = init_params(2)
    out = transfer.transfer_trajectory(
        [source_init, source_final],
        target_init,
        None,
        None,
        spec,
        method="naive",
        num_steps=T,
    )
    assert out.grad_calls == 0 and out.objectives == []
    for t in range(T + 1):
        c = t / T
        expected = jax.tree.map(
            lambda t0, a, b, c=c: t0 + c * (b - a),
            target_init,
            source_init,
            source_final,
        )
        chex.assert_trees_all_close(out.params[t], expected, atol=1e-6)


@pytest.mark.parametrize("method,expected", [("fgmt", 2 * T), ("gmt", T * (T + 1))])
def test_gradient_call_counts(setup, method, expected):
    spec, checkpoints, batches, _ = setup
    calls = []

    def counting_grad_fn(params, batch):
        calls.append(1)
        return grad_fn(params, batch)

    out = transfer.transfer_trajectory(
        checkpoints,
        init_params(3),
        counting_grad_fn,
        batches,
        spec,
        method=method,
        num_steps=T,
    )
    assert len(calls) == expected
    assert out.grad_calls == expected
    assert len(out.objectives) == T


def test_init_matching_and_oracle_recover_planted(setup):
    spec, checkpoints, _, planted = setup
    target_init = perm.apply_permutation(spec, planted, checkpoints[0])
    out = transfer.transfer_trajectory(
        checkpoints, target_init, None, None, spec, method="init_matching", num_steps=T
    )
    assert_same_perms(out.perms[T], planted)
    # Oracle: the target trained along the permuted trajectory.
    target_trained = perm.apply_permutation(spec, planted, checkpoints[-1])
    other_init = init_params(4)
    shifted = jax.tree.map(
        lambda a, b, c: a - b + c, target_trained, target_init, other_init
    )
    out = transfer.transfer_trajectory(
        checkpoints,
        other_init,
        None,
        None,
        spec,
        method="oracle",
        num_steps=T,
        target_trained=shifted,
    )
    assert_same_perms(out.perms[T], planted)
    assert out.grad_calls == 0 and len(out.objectives) == 1


def test_evaluate_trajectory_batch_stats_and_best_step(setup):
    spec, checkpoints, batches, _ = setup
    held_out = make_batches(300, 1)[0]
    seen_stats = []

    def batch_stats_fn(params):
        # Stand-in statistics: the mean activation of the first layer.
        return {"mean": jnp.mean(held_out[0] @ params["layers"][0]["kernel"], axis=0)}

    def eval_fn(params, stats):
        seen_stats.append(stats)
        return -float(loss(params, held_out))

    out = transfer.transfer_trajectory(
        checkpoints, init_params(5), grad_fn, batches, spec, num_steps=T
    )
    scored = transfer.evaluate_trajectory(
        out.params, eval_fn, batch_stats_fn=batch_stats_fn
    )
    expected = [-float(loss(p, held_out)) for p in out.params]
    np.testing.assert_allclose(scored.scores, expected, rtol=1e-6)
    assert scored.best_step == int(np.argmax(expected))
    assert len(scored.batch_stats) == T + 1
    chex.assert_trees_all_close(seen_stats, scored.batch_stats)
    chex.assert_trees_all_close(scored.batch_stats[2], batch_stats_fn(out.params[2]))


def test_evaluate_trajectory_skips_nan_scores():
    steps = [0.0, 1.0, 2.0, 3.0]
    table = {0.0: 0.5, 1.0: float("nan"), 2.0: 0.7, 3.0: 0.7}
    scored = transfer.evaluate_trajectory(steps, lambda p: table[p])
    assert scored.best_step == 2  # NaN never wins; first of the tied 0.7
    assert scored.batch_stats is None
    np.testing.assert_equal(scored.scores, [0.5, np.nan, 0.7, 0.7])
    nan_only = transfer.evaluate_trajectory(steps, lambda p: float("nan"))
    assert nan_only.best_step == 0


def test_same_seed_is_deterministic(setup):
    spec, checkpoints, batches, _ = setup
    run = lambda: transfer.transfer_trajectory(  # noqa: E731
        checkpoints,
        init_params(6),
        grad_fn,
        batches,
        spec,
        num_steps=T,
        matching=perm.MatchingOptions(seed=3),
    )
    a, b = run(), run()
    chex.assert_trees_all_equal(a.params, b.params)
    assert_same_perms(a.perms, b.perms)
    assert a.objectives == b.objectives


def test_transfer_params_jit_matches_closed_form(setup):
    spec, checkpoints, _, planted = setup
    target_init = init_params(7)
    jitted = jax.jit(transfer.transfer_params)(
        target_init, checkpoints[0], checkpoints[2], planted, spec
    )
    expected = jax.tree.map(
        lambda t0, d: t0 + d,
        target_init,
        perm.apply_permutation(
            spec,
            planted,
            jax.tree.map(lambda a, b: a - b, checkpoints[2], checkpoints[0]),
        ),
    )
    chex.assert_trees_all_close(jitted, expected, atol=1e-6)


def test_schedule_coefficients_closed_form():
    np.testing.assert_allclose(
        transfer.schedule_coefficients(4), [0.25, 0.5, 0.75, 1.0]
    )
    s = 5
    w = [1 + np.cos(np.pi * u / s) for u in range(s)]
    expected = np.cumsum(w) / sum(w)
    np.testing.assert_allclose(transfer.schedule_coefficients(s, "cosine"), expected)
    assert np.all(np.diff(transfer.schedule_coefficients(s, "cosine")) > 0)
    # Cosine takes its largest step first.
    c = transfer.schedule_coefficients(s, "cosine")
    assert c[0] > np.max(np.diff(c))


def test_source_trajectory_is_piecewise_linear(setup):
    _, checkpoints, _, _ = setup
    a, b, c = checkpoints[0], checkpoints[2], checkpoints[4]
    traj = transfer.source_trajectory([a, b, c], 4, "uniform")
    assert len(traj) == 5
    chex.assert_trees_all_equal(traj[2], b)
    chex.assert_trees_all_close(
        traj[1], jax.tree.map(lambda x, y: 0.5 * (x + y), a, b), atol=1e-6
    )
    chex.assert_trees_all_close(
        traj[3], jax.tree.map(lambda x, y: 0.5 * (x + y), b, c), atol=1e-6
    )


# --------------------------------------------------------------------------
# Bad input: one test per case
# --------------------------------------------------------------------------


def test_rejects_unknown_method(setup):
    spec, checkpoints, batches, _ = setup
    with pytest.raises(ValueError, match="method must be one of"):
        transfer.transfer_trajectory(
            checkpoints, checkpoints[0], grad_fn, batches, spec, method="sgd"
        )


def test_rejects_unknown_schedule(setup):
    spec, checkpoints, batches, _ = setup
    with pytest.raises(ValueError, match="schedule must be one of"):
        transfer.transfer_trajectory(
            checkpoints,
            checkpoints[0],
            grad_fn,
            batches,
            spec,
            num_steps=T,
            schedule="linear",
        )


def test_rejects_num_steps_not_multiple_of_segments(setup):
    spec, checkpoints, batches, _ = setup
    with pytest.raises(
        ValueError, match="num_steps=6 must be a multiple of the 4 segments"
    ):
        transfer.transfer_trajectory(
            checkpoints, checkpoints[0], grad_fn, batches, spec, num_steps=6
        )


def test_rejects_too_few_batches(setup):
    spec, checkpoints, batches, _ = setup
    with pytest.raises(
        ValueError, match="batches must hold at least num_steps=4 batches, got 2"
    ):
        transfer.transfer_trajectory(
            checkpoints, checkpoints[0], grad_fn, batches[:2], spec, num_steps=T
        )


def test_rejects_oracle_without_target(setup):
    spec, checkpoints, _, _ = setup
    with pytest.raises(ValueError, match="needs target_trained"):
        transfer.transfer_trajectory(
            checkpoints, checkpoints[0], None, None, spec, method="oracle", num_steps=T
        )


def test_rejects_gradient_method_without_grad_fn(setup):
    spec, checkpoints, _, _ = setup
    with pytest.raises(ValueError, match="method='fgmt' needs grad_fn and batches"):
        transfer.transfer_trajectory(
            checkpoints, checkpoints[0], None, None, spec, num_steps=T
        )


def test_rejects_matching_that_is_not_options(setup):
    spec, checkpoints, batches, _ = setup
    with pytest.raises(TypeError, match="matching must be a MatchingOptions"):
        transfer.transfer_trajectory(
            checkpoints, checkpoints[0], grad_fn, batches, spec, matching="optax"
        )


def test_non_finite_gradients_raise_naming_the_pair(setup):
    spec, checkpoints, batches, _ = setup

    def nan_grad_fn(params, batch):
        return jax.tree.map(lambda g: g.at[0].set(jnp.nan), grad_fn(params, batch))

    with pytest.raises(ValueError, match=r"pairs\[0\]\[0\] has a non-finite value"):
        transfer.transfer_trajectory(
            checkpoints, checkpoints[0], nan_grad_fn, batches, spec, num_steps=T
        )


def test_rejects_mismatched_source(setup):
    spec, checkpoints, batches, _ = setup
    bad = {"layers": dict(checkpoints[1]["layers"])}
    bad["layers"][0] = {
        "kernel": jnp.zeros((SIZES[0], SIZES[1] + 1)),
        "bias": jnp.zeros(SIZES[1]),
    }
    with pytest.raises(
        ValueError,
        match=r"source\[1\] does not match target_init .* \['layers/0/kernel'\]",
    ):
        transfer.transfer_trajectory(
            [checkpoints[0], bad], checkpoints[0], grad_fn, batches, spec, num_steps=T
        )


def test_rejects_batch_statistics():
    model = nnx.Sequential(
        nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
        nnx.BatchNorm(4, rngs=nnx.Rngs(0)),
        nnx.Linear(4, 2, rngs=nnx.Rngs(0)),
    )
    spec = perm.mlp_spec(model)
    full = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)).to_pure_dict()
    with pytest.raises(
        ValueError, match="target_init contains batch-statistics leaf 'layers/1/mean'"
    ):
        transfer.transfer_trajectory(
            [full, full], full, None, None, spec, method="naive", num_steps=2
        )
