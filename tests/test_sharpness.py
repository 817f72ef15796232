"""Tests of the sharpness-aware oracle and its optax wrapper (single device).

References are derived independently: the closed-form table of the SAM family
on L = 1/2 w^T diag(1, 10) w (docs and ALGORITHMS.md), a float64 NumPy
re-implementation for quadratics, 1-D and uniform-scale identities, the linear
recursions of (Stable) USAM on a quadratic, and optax.contrib.sam.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_wa

H = np.array([1.0, 10.0])
W0 = np.array([1.0, 1.0])


def quadratic(w):
    return 0.5 * jnp.sum(jnp.asarray(H, jnp.float32) * w**2)


def np_sam_quadratic(h, w, rho, perturbation, adaptive=False, eta=0.01, stable=False):
    """Float64 SAM-family step on L = 1/2 sum(h w^2); returns (descent, gamma)."""
    h, w = np.asarray(h, np.float64), np.asarray(w, np.float64)
    g = h * w
    t = np.abs(w) + eta if adaptive else np.ones_like(w)
    norm = np.linalg.norm(t * g)
    eps = rho * t * t * g / norm if perturbation == "sam" else rho * t * t * g
    g_adv = h * (w + eps)
    gamma = norm / np.linalg.norm(t * g_adv)
    return (gamma * g_adv if stable else g_adv), gamma


def _oracle(loss, **kw):
    return jax.jit(optax_wa.sam_value_and_grad(loss, **kw))


# ---------------------------------------------------------------- closed forms


@pytest.mark.parametrize(
    "perturbation, g_adv, gamma, ssam_step",
    [
        ("sam", (1.009950, 10.995037), 0.910206, (0.919263, 10.007745)),
        ("usam", (1.1, 20.0), 0.501735, (0.551909, 10.034710)),
    ],
)
def test_closed_form_table(perturbation, g_adv, gamma, ssam_step):
    w = jnp.asarray(W0, jnp.float32)
    _, plain, info = _oracle(quadratic, rho=0.1, perturbation=perturbation)(w)
    (loss, aux), stable, stable_info = _oracle(
        quadratic, rho=0.1, perturbation=perturbation, stable=True
    )(w)
    np.testing.assert_allclose(plain, g_adv, rtol=2e-6)
    np.testing.assert_allclose(stable, ssam_step, rtol=2e-6)
    np.testing.assert_allclose(info.gamma, gamma, rtol=2e-6)
    np.testing.assert_allclose(stable_info.gamma, gamma, rtol=2e-6)
    # The SSAM step has the norm of the clean gradient, 10.049876 = sqrt(101).
    np.testing.assert_allclose(np.linalg.norm(stable), 10.049876, rtol=2e-6)
    np.testing.assert_allclose(info.grad_norm, np.sqrt(101.0), rtol=1e-6)
    np.testing.assert_allclose(loss, 5.5, rtol=1e-6)
    assert aux is None


@pytest.mark.parametrize("perturbation", ["sam", "usam"])
@pytest.mark.parametrize("stable", [False, True])
def test_asam_matches_numpy_reference(perturbation, stable):
    w = np.array([2.0, -0.5])
    ref, ref_gamma = np_sam_quadratic(
        H, w, 0.1, perturbation, adaptive=True, eta=0.01, stable=stable
    )
    # The ASAM paper's reading: eta = 0.01 and both norms weighted by |w| + eta.
    _, got, info = _oracle(
        quadratic,
        rho=0.1,
        perturbation=perturbation,
        adaptive=True,
        adaptive_eta=0.01,
        adv_norm_weight="clean",
        stable=stable,
    )(jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    np.testing.assert_allclose(info.gamma, ref_gamma, rtol=1e-5)
    # ASAM differs from SAM here (non-uniform |w|): the test can tell them apart.
    sam_ref, _ = np_sam_quadratic(H, w, 0.1, perturbation, stable=stable)
    assert not np.allclose(ref, sam_ref, rtol=1e-3)


def test_asam_with_uniform_weights_is_sam_with_scaled_rho():
    # |w| = 1 everywhere: T_w = 1 + eta is a scalar, so ASAM(rho) = SAM(rho (1 + eta)).
    w = jnp.asarray(W0, jnp.float32)
    _, asam, asam_info = _oracle(
        quadratic, rho=0.1, adaptive=True, adaptive_eta=0.5, adv_norm_weight="clean"
    )(w)
    _, sam, sam_info = _oracle(quadratic, rho=0.15)(w)
    chex.assert_trees_all_close(asam, sam, rtol=1e-6)
    chex.assert_trees_all_close(asam_info.gamma, sam_info.gamma, rtol=1e-6)


@pytest.mark.parametrize(
    "options",
    [
        {"perturbation": "sam"},
        {"perturbation": "usam"},
        {"perturbation": "sam", "adaptive": True, "adv_norm_weight": "clean"},
    ],
    ids=["sam", "usam", "asam_clean"],
)
def test_one_dimensional_ssam_is_sgd(options):
    # In 1-D g_adv is parallel to g, so rescaling it to |g| gives g back.
    loss = lambda w: 0.5 * 7.0 * jnp.sum(w**2)
    w = jnp.array([0.3])
    _, descent, info = _oracle(loss, rho=0.2, stable=True, **options)(w)
    np.testing.assert_allclose(descent, 7.0 * 0.3, rtol=1e-6)
    assert float(info.gamma) < 1.0  # the perturbed gradient was larger


def _random_tree(seed):
    keys = jax.random.split(jax.random.key(seed), 3)
    return {
        "a": jax.random.normal(keys[0], (3, 4)),
        "b": [jax.random.normal(keys[1], (5,)), jax.random.normal(keys[2], (2, 2))],
    }


def _nonlinear_loss(params):
    return sum(
        jnp.sum(jnp.sin(3.0 * x) + 0.25 * x**4 + x) for x in jax.tree.leaves(params)
    )


_nonlinear_grad = jax.jit(jax.grad(_nonlinear_loss))


def _norm(tree):
    return float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(tree))))


@pytest.mark.parametrize("perturbation", ["sam", "usam"])
def test_ssam_gradient_norm_equals_clean_gradient_norm(perturbation):
    oracle = _oracle(_nonlinear_loss, rho=0.3, perturbation=perturbation, stable=True)
    for seed in range(3):
        params = _random_tree(seed)
        _, descent, info = oracle(params)
        clean_norm = _norm(_nonlinear_grad(params))
        np.testing.assert_allclose(_norm(descent), clean_norm, rtol=1e-5)
        np.testing.assert_allclose(info.grad_norm, clean_norm, rtol=1e-5)
        assert abs(float(info.gamma) - 1.0) > 1e-3  # the renormalization did something


def test_stable_asam_clean_weight_preserves_weighted_norm():
    params = _random_tree(5)
    _, descent, info = _oracle(
        _nonlinear_loss,
        rho=0.3,
        adaptive=True,
        adaptive_eta=0.01,
        adv_norm_weight="clean",
        stable=True,
    )(params)
    t = jax.tree.map(lambda w: jnp.abs(w) + 0.01, params)
    weighted = lambda g: _norm(jax.tree.map(jnp.multiply, t, g))
    np.testing.assert_allclose(
        weighted(descent), weighted(_nonlinear_grad(params)), rtol=1e-5
    )
    np.testing.assert_allclose(
        info.grad_norm, weighted(_nonlinear_grad(params)), rtol=1e-5
    )


def test_non_stable_returns_adversarial_gradient_unchanged():
    params = _random_tree(1)
    rho = 0.3
    (loss, _), descent, info = _oracle(_nonlinear_loss, rho=rho)(params)
    g = _nonlinear_grad(params)
    norm = _norm(g)
    adv_params = jax.tree.map(lambda w, gi: w + rho * gi / norm, params, g)
    chex.assert_trees_all_close(descent, _nonlinear_grad(adv_params), rtol=1e-5)
    np.testing.assert_allclose(info.adv_loss, _nonlinear_loss(adv_params), rtol=1e-5)
    np.testing.assert_allclose(loss, _nonlinear_loss(params), rtol=1e-6)
    np.testing.assert_allclose(info.adv_grad_norm, _norm(descent), rtol=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        {"perturbation": "sam"},
        {"perturbation": "usam"},
        {"adaptive": True},
        {"stable": True},
        {"stable": True, "eps": 0.0},
        {"stable": True, "adaptive": True, "eps": 0.0},
        {"stable": True, "perturbation": "usam", "max_scale": 1.0},
    ],
    ids=["sam", "usam", "asam", "ssam", "ssam_eps0", "sasam_eps0", "susam_capped"],
)
def test_zero_gradient_gives_zeros_not_nan(options):
    # At w = 0 both g and g_adv vanish.
    loss = lambda p: 0.5 * sum(jnp.sum(x**2) for x in jax.tree.leaves(p))
    params = jax.tree.map(jnp.zeros_like, _random_tree(0))
    (value, _), descent, info = _oracle(loss, rho=0.1, **options)(params)
    chex.assert_tree_all_finite((value, descent, info))
    chex.assert_trees_all_equal(descent, params)
    np.testing.assert_array_equal(info.gamma, 0.0)
    np.testing.assert_array_equal(info.grad_norm, 0.0)


# ---------------------------------------------------------------- stability


def _run_quadratic(options, lr, num_steps):
    """Trajectory of w on L = 1/2 w^T diag(1, 10) w with plain GD on the descent."""
    oracle = optax_wa.sam_value_and_grad(quadratic, rho=0.2, **options)

    def step(w, _):
        _, d, _ = oracle(w)
        w = w - lr * d
        return w, w

    _, ws = jax.jit(lambda w: jax.lax.scan(step, w, None, length=num_steps))(
        jnp.asarray(W0, jnp.float32)
    )
    return np.asarray(ws)


def test_usam_diverges_and_stable_usam_is_bounded_on_quadratic():
    # lambda_max = 10, rho = 0.2: USAM is stable below 2 / (10 (1 + 2)) = 0.0667.
    # USAM is linear: w <- (I - lr (H + rho H^2)) w, so the stiff coordinate is
    # multiplied by 1 - 0.07 * 30 = -1.1 per step, exactly.
    usam = _run_quadratic({"perturbation": "usam"}, lr=0.07, num_steps=60)
    np.testing.assert_allclose(usam[:, 1], (-1.1) ** np.arange(1, 61), rtol=1e-4)
    assert np.linalg.norm(usam[-1]) > 300.0
    # Stable USAM keeps the gradient-descent limit 2 / lambda_max = 0.2.
    stable = _run_quadratic(
        {"perturbation": "usam", "stable": True}, lr=0.19, num_steps=400
    )
    norms = np.linalg.norm(stable, axis=1)
    assert np.all(np.isfinite(norms))
    assert norms.max() <= np.linalg.norm(W0)
    assert norms[-1] < 1e-3
    # ... and no further: above 2 / lambda_max it diverges as gradient descent does.
    beyond = _run_quadratic(
        {"perturbation": "usam", "stable": True}, lr=0.21, num_steps=400
    )
    assert np.linalg.norm(beyond[-1]) > 10.0


# ---------------------------------------------------------------- optax parity


def test_one_step_parity_with_optax_contrib_sam_opaque():
    rho, lr = 0.05, 0.1
    ours = optax_wa.sharpness_aware(optax.sgd(lr, momentum=0.9), rho=rho)
    # optax: one normalized ascent step (sync_period=2) by sgd(rho), whose update
    # -rho * g / |g| is negated into the ascent; normalize() has no eps.
    theirs = optax.contrib.sam(
        optax.sgd(lr, momentum=0.9),
        optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
        sync_period=2,
        opaque_mode=True,
    )
    grad = _nonlinear_grad
    ours_update = jax.jit(lambda g, s, p: ours.update(g, s, p, grad_fn=grad))
    theirs_update = jax.jit(
        lambda g, s, p: theirs.update(g, s, p, grad_fn=lambda q, _: grad(q))
    )
    p_ours = p_theirs = _random_tree(3)
    s_ours, s_theirs = ours.init(p_ours), theirs.init(p_theirs)
    for _ in range(3):
        u_ours, s_ours = ours_update(grad(p_ours), s_ours, p_ours)
        u_theirs, s_theirs = theirs_update(grad(p_theirs), s_theirs, p_theirs)
        chex.assert_trees_all_close(u_ours, u_theirs, rtol=1e-5, atol=1e-6)
        p_ours = optax.apply_updates(p_ours, u_ours)
        p_theirs = optax.apply_updates(p_theirs, u_theirs)
    chex.assert_trees_all_close(p_ours, p_theirs, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- dtypes


def test_bf16_params_use_float32_norms():
    values = np.array([1.0, 2.0, 3.0, 5.0, 7.0, 11.0], np.float32)
    params = {"w": jnp.asarray(values, jnp.bfloat16)}  # exactly representable
    loss = lambda p: 0.5 * jnp.sum(p["w"].astype(jnp.float32) ** 2)
    (_, _), descent, info = _oracle(loss, rho=0.1, stable=True)(params)
    assert descent["w"].dtype == jnp.bfloat16
    for field in (info.gamma, info.grad_norm, info.adv_grad_norm, info.adv_loss):
        assert field.dtype == jnp.float32
    # sqrt(209) = 14.4568...; bfloat16 would round it to 14.4375.
    np.testing.assert_allclose(info.grad_norm, np.sqrt(209.0), rtol=1e-6)
    # The perturbed params are w + rho w/|w| rounded to bf16, then g_adv = that.
    adv = jnp.asarray(values + 0.1 * values / np.sqrt(209.0), jnp.bfloat16)
    adv = np.asarray(adv, np.float32)
    np.testing.assert_allclose(info.adv_grad_norm, np.linalg.norm(adv), rtol=1e-6)
    expected = np.sqrt(209.0) / np.linalg.norm(adv) * adv
    np.testing.assert_allclose(
        np.asarray(descent["w"], np.float32), expected, rtol=8e-3
    )


# ---------------------------------------------------------------- the wrapper


def test_wrapper_equals_oracle_then_inner():
    inner = optax.sgd(0.1, momentum=0.9)
    opt = optax_wa.ssam(inner, rho=0.2, perturbation="usam")
    oracle = optax_wa.sam_value_and_grad(
        _nonlinear_loss, rho=0.2, perturbation="usam", stable=True
    )
    grad = _nonlinear_grad
    params = ref_params = _random_tree(4)
    state, ref_state = opt.init(params), inner.init(ref_params)
    for _ in range(3):
        updates, state = opt.update(grad(params), state, params, grad_fn=grad)
        _, descent, info = oracle(ref_params)
        ref_updates, ref_state = inner.update(descent, ref_state, ref_params)
        chex.assert_trees_all_close(updates, ref_updates, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state.info.gamma, info.gamma, rtol=1e-5)
        assert state.info.adv_loss is None
        params = optax.apply_updates(params, updates)
        ref_params = optax.apply_updates(ref_params, ref_updates)
    assert int(state.count) == 3


@pytest.mark.parametrize("stable", [False, True])
def test_record_info_false_gives_same_updates_and_no_info(stable):
    grad = _nonlinear_grad
    kw = dict(rho=0.2, stable=stable)
    full = optax_wa.sharpness_aware(optax.sgd(0.1, momentum=0.9), **kw)
    lean = optax_wa.sharpness_aware(
        optax.sgd(0.1, momentum=0.9), record_info=False, **kw
    )
    params = lean_params = _random_tree(4)
    state, lean_state = full.init(params), lean.init(lean_params)
    assert lean_state.info is None
    for _ in range(3):
        updates, state = full.update(grad(params), state, params, grad_fn=grad)
        lean_updates, lean_state = jax.jit(
            lambda g, s, p: lean.update(g, s, p, grad_fn=grad)
        )(grad(lean_params), lean_state, lean_params)
        chex.assert_trees_all_close(updates, lean_updates, rtol=1e-6, atol=1e-7)
        assert lean_state.info is None
        params = optax.apply_updates(params, updates)
        lean_params = optax.apply_updates(lean_params, lean_updates)
    assert int(lean_state.count) == 3 and float(state.info.gamma) > 0


def test_wrapper_has_aux_discards_perturbed_aux():
    grad = _nonlinear_grad
    params = _random_tree(2)
    plain = optax_wa.sharpness_aware(optax.sgd(0.1), rho=0.1)
    with_aux = optax_wa.sharpness_aware(optax.sgd(0.1), rho=0.1, has_aux=True)
    ref, _ = plain.update(grad(params), plain.init(params), params, grad_fn=grad)
    got, _ = with_aux.update(
        grad(params),
        with_aux.init(params),
        params,
        grad_fn=lambda p: (grad(p), {"x": 1.0}),
    )
    chex.assert_trees_all_equal(ref, got)


def test_wrapper_rho_schedule_is_evaluated_at_the_count():
    schedule = optax.linear_schedule(0.1, 0.3, transition_steps=1)
    opt = optax_wa.sharpness_aware(optax.sgd(1.0), rho=schedule)
    w = jnp.asarray(W0, jnp.float32)
    state = opt.init(w)
    for rho in (0.1, 0.3):
        updates, state = opt.update(
            jax.grad(quadratic)(w), state, w, grad_fn=jax.grad(quadratic)
        )
        ref, _ = np_sam_quadratic(H, W0, rho, "sam")
        np.testing.assert_allclose(-updates, ref, rtol=1e-5)


def test_max_scale_caps_gamma():
    # L = -cos(w): at w = 2 the ascent to 2 + rho lowers |sin|, so gamma > 1.
    loss = lambda w: -jnp.sum(jnp.cos(w))
    w = jnp.array([2.0])
    gamma = np.sin(2.0) / np.sin(2.1)
    _, free, free_info = _oracle(loss, rho=0.1, stable=True)(w)
    _, capped, capped_info = _oracle(loss, rho=0.1, stable=True, max_scale=1.0)(w)
    np.testing.assert_allclose(free_info.gamma, gamma, rtol=1e-5)
    np.testing.assert_allclose(free, np.sin(2.0), rtol=1e-5)
    np.testing.assert_allclose(capped_info.gamma, 1.0)
    np.testing.assert_allclose(capped, np.sin(2.1), rtol=1e-5)


def test_adaptive_mask_gives_unit_scale_to_unselected_leaves():
    params = {"w": jnp.array([2.0, -0.5]), "b": jnp.array([0.25])}
    loss = lambda p: (
        0.5 * jnp.sum(jnp.array([1.0, 10.0]) * p["w"] ** 2) + 2.0 * jnp.sum(p["b"] ** 2)
    )
    rho, eta = 0.1, 0.01
    # NumPy reference: T_w = |w| + eta for "w", T = 1 for "b".
    w, b = np.array([2.0, -0.5]), np.array([0.25])
    gw, gb = np.array([1.0, 10.0]) * w, 4.0 * b
    tw = np.abs(w) + eta
    norm = np.sqrt(np.sum((tw * gw) ** 2) + np.sum(gb**2))
    adv_w, adv_b = w + rho * tw**2 * gw / norm, b + rho * gb / norm
    expected = {"w": np.array([1.0, 10.0]) * adv_w, "b": 4.0 * adv_b}
    for mask in (
        {"w": True, "b": False},
        lambda p: jax.tree.map(lambda x: x.size > 1, p),
    ):
        _, got, _ = _oracle(
            loss, rho=rho, adaptive=True, adaptive_eta=eta, adaptive_mask=mask
        )(params)
        chex.assert_trees_all_close(got, expected, rtol=1e-5)
    # Default: every leaf adaptive, which is a different number for "b".
    _, all_adaptive, _ = _oracle(loss, rho=rho, adaptive=True, adaptive_eta=eta)(params)
    _, all_true, _ = _oracle(
        loss,
        rho=rho,
        adaptive=True,
        adaptive_eta=eta,
        adaptive_mask={"w": True, "b": True},
    )(params)
    chex.assert_trees_all_close(all_adaptive, all_true, rtol=1e-6)
    assert not np.allclose(all_adaptive["b"], expected["b"], rtol=1e-3)


def test_same_args_reach_both_passes():
    # A loss with a batch and an RNG key: both passes see the same ones.
    def loss(w, batch, key):
        noise = jax.random.normal(key, batch.shape)
        return jnp.mean((batch + noise) * w**2)

    batch, key = jnp.arange(4.0), jax.random.key(7)
    w = jnp.array([0.5, -1.0, 2.0, 0.1])
    _, got, _ = _oracle(loss, rho=0.1)(w, batch, key)
    g = jax.grad(loss)(w, batch, key)
    adv = w + 0.1 * g / jnp.linalg.norm(g)
    chex.assert_trees_all_close(got, jax.grad(loss)(adv, batch, key), rtol=1e-5)


# ---------------------------------------------------------------- bad input


def test_update_without_grad_fn_raises():
    opt = optax_wa.ssam(optax.sgd(0.1))
    params = jnp.ones(2)
    with pytest.raises(ValueError, match="grad_fn"):
        opt.update(params, opt.init(params), params)


def test_update_without_params_raises():
    opt = optax_wa.ssam(optax.sgd(0.1))
    params = jnp.ones(2)
    with pytest.raises(ValueError, match="params"):
        opt.update(params, opt.init(params), None, grad_fn=jax.grad(jnp.sum))


def test_negative_rho_raises():
    with pytest.raises(ValueError, match="rho"):
        optax_wa.sharpness_aware(optax.sgd(0.1), rho=-0.1)


def test_schedule_rho_in_oracle_raises():
    with pytest.raises(ValueError, match="rho"):
        optax_wa.sam_value_and_grad(jnp.sum, rho=optax.constant_schedule(0.1))


def test_unknown_perturbation_raises():
    with pytest.raises(ValueError, match="perturbation"):
        optax_wa.sam_value_and_grad(jnp.sum, perturbation="asam")


def test_negative_adaptive_eta_raises():
    with pytest.raises(ValueError, match="adaptive_eta"):
        optax_wa.sam_value_and_grad(jnp.sum, adaptive=True, adaptive_eta=-1.0)


def test_adaptive_mask_without_adaptive_raises():
    with pytest.raises(ValueError, match="adaptive_mask"):
        optax_wa.sam_value_and_grad(jnp.sum, adaptive_mask={"w": True})


def test_adaptive_mask_with_wrong_structure_raises():
    oracle = optax_wa.sam_value_and_grad(
        lambda p: jnp.sum(p["w"]), adaptive=True, adaptive_mask={"v": True}
    )
    with pytest.raises(ValueError, match="adaptive_mask"):
        oracle({"w": jnp.ones(2)})


def test_nonpositive_max_scale_raises():
    with pytest.raises(ValueError, match="max_scale"):
        optax_wa.ssam(optax.sgd(0.1), max_scale=0.0)


def test_negative_eps_raises():
    with pytest.raises(ValueError, match="eps"):
        optax_wa.sam_value_and_grad(jnp.sum, eps=-1e-12)


def test_sync_ascent_without_axis_name_raises():
    with pytest.raises(ValueError, match="axis_name"):
        optax_wa.sharpness_aware(optax.sgd(0.1), sync_ascent=True)


def test_ssam_with_stable_keyword_raises():
    # ssam has no ``stable`` argument (it is always stable).
    with pytest.raises(TypeError, match="stable"):
        optax_wa.ssam(optax.sgd(0.1), stable=False)


# ---------------------------------------------------------------- released code


def np_released_step(grad, params, rho, perturbation, adaptive, stable, **kw):
    """Float64 re-implementation of one step of the released SAM / USAM classes.

    ``grad(list of arrays) -> list of arrays``; ``params`` a list of arrays.
    Options beyond the released code: ``eta`` (T = |w| + eta), ``adv_weight``
    ("perturbed": T' = |w + e| + eta, as released; "clean": T' = T), ``eps``
    ``round_adv`` (a rounding of the perturbed params, e.g. to bf16) and
    ``clean_grad`` (the gradient the ascent starts from, default ``grad(w)``).
    Returns ``(descent, gamma, grad_norm, adv_grad_norm)``.
    """
    eta, eps = kw.get("eta", 0.0), kw.get("eps", 1e-12)
    adv_weight, round_adv = kw.get("adv_weight", "perturbed"), kw.get("round_adv")
    w = [np.asarray(p, np.float64) for p in params]
    g = kw.get("clean_grad") or grad(w)

    def weight(ws):
        return [np.abs(x) + eta if adaptive else np.ones_like(x) for x in ws]

    def norm(ts, gs):
        return np.sqrt(sum(np.sum((t * x) ** 2) for t, x in zip(ts, gs)))

    t = weight(w)
    grad_norm = norm(t, g)
    scale = rho / (grad_norm + eps) if perturbation == "sam" else rho
    adv = [x + ti * ti * gi * scale for x, ti, gi in zip(w, t, g)]
    if round_adv is not None:
        adv = [round_adv(x) for x in adv]
    g_adv = grad(adv)
    t_adv = weight(adv) if adv_weight == "perturbed" else t
    adv_grad_norm = norm(t_adv, g_adv)
    gamma = grad_norm / (adv_grad_norm + eps)
    descent = [gamma * x for x in g_adv] if stable else g_adv
    return descent, gamma, grad_norm, adv_grad_norm


def _mlp(params, x):
    return jnp.tanh(x @ params["w"] + params["b"]) @ params["v"]


def _mlp_loss(params, x, y):
    return jnp.mean((_mlp(params, x) - y) ** 2)


def _np_mlp_grad(x, y):
    """Hand-derived float64 gradient of ``_mlp_loss``; leaves in (b, v, w) order."""

    def grad(leaves):
        b, v, w = leaves
        h = np.tanh(x @ w + b)
        dpred = 2.0 * (h @ v - y) / len(y)
        dz = np.outer(dpred, v) * (1.0 - h**2)
        return [dz.sum(0), h.T @ dpred, x.T @ dz]

    return grad


def _mlp_problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "w": rng.normal(size=(3, 4)).astype(np.float32),
        "b": (0.3 * rng.normal(size=4)).astype(np.float32),
        "v": rng.normal(size=4).astype(np.float32),
    }
    x = rng.normal(size=(16, 3)).astype(np.float32)
    y = rng.normal(size=16).astype(np.float32)
    return params, x, y


_RELEASED_VARIANTS = {
    "sam": ("sam", False, False, 0.05),
    "usam": ("usam", False, False, 0.05),
    "asam": ("sam", True, False, 0.5),
    "usam_adaptive": ("usam", True, False, 0.5),
    "ssam_sam": ("sam", False, True, 0.05),
    "ssam_usam": ("usam", False, True, 0.05),
    "ssam_asam": ("sam", True, True, 0.5),
    "ssam_usam_adaptive": ("usam", True, True, 0.5),
}


def _np_released_run(params, x, y, variant, num_steps, lr, momentum, wd, **kw):
    """The released loop: SAM step, then torch SGD (momentum, weight decay)."""
    perturbation, adaptive, stable, rho = _RELEASED_VARIANTS[variant]
    grad = _np_mlp_grad(np.asarray(x, np.float64), np.asarray(y, np.float64))
    w = [np.asarray(params[k], np.float64) for k in ("b", "v", "w")]
    buf = None
    trajectory = []
    for _ in range(num_steps):
        d, *_ = np_released_step(grad, w, rho, perturbation, adaptive, stable, **kw)
        d = [di + wd * wi for di, wi in zip(d, w)]  # SGD(weight_decay=wd)
        buf = d if buf is None else [momentum * bi + di for bi, di in zip(buf, d)]
        w = [wi - lr * bi for wi, bi in zip(w, buf)]
        trajectory.append(dict(zip(("b", "v", "w"), w)))
    return trajectory


@pytest.mark.parametrize(
    "variant, adv_weight",
    [(v, "perturbed") for v in sorted(_RELEASED_VARIANTS)]
    # adv_norm_weight only matters with adaptive=True.
    + [(v, "clean") for v in sorted(_RELEASED_VARIANTS) if _RELEASED_VARIANTS[v][1]],
)
def test_matches_numpy_reimplementation_of_released_code(variant, adv_weight):
    # The released classes wrapping torch SGD(momentum=0.9, weight_decay=5e-4),
    # five steps on a tanh MLP with biases; ASAM's T = |w| on every leaf.
    params, x, y = _mlp_problem()
    lr, momentum, wd, num_steps = 0.1, 0.9, 5e-4, 5
    expected = _np_released_run(
        params, x, y, variant, num_steps, lr, momentum, wd, adv_weight=adv_weight
    )
    perturbation, adaptive, stable, rho = _RELEASED_VARIANTS[variant]
    opt = optax_wa.sharpness_aware(
        optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=momentum)),
        rho=rho,
        perturbation=perturbation,
        adaptive=adaptive,
        adv_norm_weight=adv_weight,
        stable=stable,
    )
    grad_fn = jax.grad(_mlp_loss)
    update = jax.jit(
        lambda g, s, p: opt.update(g, s, p, grad_fn=lambda q: grad_fn(q, x, y))
    )
    p = jax.tree.map(jnp.asarray, params)
    state = opt.init(p)
    for step in range(num_steps):
        updates, state = update(grad_fn(p, x, y), state, p)
        p = optax.apply_updates(p, updates)
        for k in p:
            np.testing.assert_allclose(p[k], expected[step][k], rtol=0, atol=1e-5)
    # The two readings of Stable ASAM differ measurably on this problem.
    if stable and adaptive:
        other = "clean" if adv_weight == "perturbed" else "perturbed"
        reference = _np_released_run(
            params, x, y, variant, num_steps, lr, momentum, wd, adv_weight=other
        )
        gap = max(np.max(np.abs(p[k] - reference[-1][k])) for k in p)
        assert gap > 1e-4, gap


def test_default_adaptive_eta_is_zero_and_asam_paper_eta_is_an_option():
    params, x, y = _mlp_problem(1)
    grad = _np_mlp_grad(np.asarray(x, np.float64), np.asarray(y, np.float64))
    leaves = [params[k] for k in ("b", "v", "w")]
    oracle = lambda **kw: _oracle(_mlp_loss, rho=0.5, adaptive=True, stable=True, **kw)
    for kw, eta in (({}, 0.0), ({"adaptive_eta": 0.01}, 0.01)):
        ref, gamma, *_ = np_released_step(grad, leaves, 0.5, "sam", True, True, eta=eta)
        _, got, info = oracle(**kw)(jax.tree.map(jnp.asarray, params), x, y)
        for k, r in zip(("b", "v", "w"), ref):
            np.testing.assert_allclose(got[k], r, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(info.gamma, gamma, rtol=1e-5)


def test_one_dimensional_released_stable_asam_closed_form():
    # 1-D, L = 7/2 w^2, T = |w|: ||T g|| = 7 w^2, e = rho w^2 (7 w) / (7 w^2) =
    # rho w, g_adv = 7 w (1 + rho), T' = |w| (1 + rho), so gamma g_adv =
    # 7 w^2 / (|w| (1 + rho) 7 |w| (1 + rho)) * 7 w (1 + rho) = 7 w / (1 + rho):
    # the gradient step shrunk by 1 + rho (with T' = T it would be 7 w exactly).
    loss = lambda w: 0.5 * 7.0 * jnp.sum(w**2)
    for w in (0.3, -2.0):
        _, descent, info = _oracle(loss, rho=0.2, adaptive=True, stable=True)(
            jnp.array([w])
        )
        np.testing.assert_allclose(descent, 7.0 * w / 1.2, rtol=1e-6)
        np.testing.assert_allclose(info.gamma, 1.0 / 1.2**2, rtol=1e-6)


def test_weight_decay_before_the_wrapper_only_tilts_the_ascent():
    # chain(add_decayed_weights, sharpness_aware(sgd)): the decay enters the
    # clean gradient (ascent direction and gamma's numerator) but the descent
    # is grad_fn's gradient at w + e, without decay: no weight decay is applied.
    params, x, y = _mlp_problem(2)
    lr, wd, rho = 0.1, 0.5, 0.05
    grad = _np_mlp_grad(np.asarray(x, np.float64), np.asarray(y, np.float64))
    leaves = [np.asarray(params[k], np.float64) for k in ("b", "v", "w")]
    decayed = [gi + wd * wi for gi, wi in zip(grad(leaves), leaves)]
    wrong, *_ = np_released_step(
        grad, leaves, rho, "sam", False, True, clean_grad=decayed
    )
    right, *_ = np_released_step(grad, leaves, rho, "sam", False, True)
    right = [d + wd * w for d, w in zip(right, leaves)]
    grad_fn = lambda q: jax.grad(_mlp_loss)(q, x, y)
    p = jax.tree.map(jnp.asarray, params)
    for opt, expected in (
        (
            optax.chain(
                optax.add_decayed_weights(wd), optax_wa.ssam(optax.sgd(lr), rho=rho)
            ),
            wrong,
        ),
        (
            optax_wa.ssam(
                optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr)), rho=rho
            ),
            right,
        ),
    ):
        updates, _ = opt.update(grad_fn(p), opt.init(p), p, grad_fn=grad_fn)
        for k, d in zip(("b", "v", "w"), expected):
            np.testing.assert_allclose(updates[k], -lr * d, rtol=1e-5, atol=1e-7)
    assert not np.allclose(wrong[2], right[2], rtol=1e-2)


# ---------------------------------------------------------------- extreme scales

_H4 = np.array([1.0, 10.0, 3.0, 0.5])
_W4 = np.array([1.0, -0.75, 0.5, 2.0])  # exactly representable in bfloat16
_SCALE_VARIANTS = {
    "sam": {"perturbation": "sam"},
    "asam": {"perturbation": "sam", "adaptive": True},
    "ssam": {"perturbation": "sam", "stable": True},
    "ssam_usam": {"perturbation": "usam", "stable": True},
    "ssam_asam": {"perturbation": "sam", "adaptive": True, "stable": True},
    "ssam_usam_adaptive": {"perturbation": "usam", "adaptive": True, "stable": True},
}


def _scaled_quadratic(scale):
    h = jnp.asarray(_H4, jnp.float32)
    return lambda w: scale * 0.5 * jnp.sum(h * w.astype(jnp.float32) ** 2)


def _rho_for(options, scale, rho=0.05):
    # USAM's perturbation rho T^2 g grows with the gradient: keep it O(rho).
    return rho / scale if options["perturbation"] == "usam" else rho


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e19, 1e30])
@pytest.mark.parametrize("variant", sorted(_SCALE_VARIANTS))
def test_extreme_gradients_match_float64_reference(variant, scale, dtype):
    # Gradients of about `scale` per element. A plain float32 sum of squares
    # overflows from 1e19 on (gamma = inf / inf) and underflows at 1e-20.
    options = _SCALE_VARIANTS[variant]
    rho = _rho_for(options, scale)
    to_dtype = lambda x: np.asarray(np.asarray(x, np.float64).astype(dtype), np.float64)
    grad = lambda ws: [to_dtype(scale * _H4 * ws[0])]
    ref, gamma, grad_norm, adv_norm = np_released_step(
        grad,
        [_W4],
        rho,
        options["perturbation"],
        options.get("adaptive", False),
        options.get("stable", False),
        round_adv=to_dtype,
    )
    loss = _scaled_quadratic(scale)
    w = jnp.asarray(_W4, dtype)
    oracle_out = _oracle(loss, rho=rho, **options)(w)
    opt = optax_wa.sharpness_aware(optax.sgd(1.0), rho=rho, **options)
    updates, state = jax.jit(
        lambda g, s, p: opt.update(g, s, p, grad_fn=jax.grad(loss))
    )(jax.grad(loss)(w), opt.init(w), w)
    rtol = 1e-5 if dtype == jnp.float32 else 1e-2
    # Below float32's smallest normal number the exact result is 0 (flushed).
    atol = float(np.finfo(np.float32).tiny)
    for descent, info in ((oracle_out[1], oracle_out[2]), (-updates, state.info)):
        assert descent.dtype == dtype
        chex.assert_tree_all_finite((descent, info.gamma, info.grad_norm))
        got = np.asarray(descent, np.float64)
        np.testing.assert_allclose(got, to_dtype(ref[0]), rtol=rtol, atol=atol)
        np.testing.assert_allclose(info.grad_norm, grad_norm, rtol=1e-5)
        np.testing.assert_allclose(info.adv_grad_norm, adv_norm, rtol=1e-5)
        np.testing.assert_allclose(info.gamma, gamma, rtol=1e-5)


@pytest.mark.parametrize("scale", [1e12, 1e15])
def test_usam_adaptive_stable_factor_where_the_adv_norm_overflows(scale):
    # USAM-adaptive with a fixed rho: e = rho T^2 g ~ scale moves w to about
    # `scale`, so T' g_adv ~ scale^3 per element (1e37 to 1e46): the norm
    # |T' g_adv| passes float32's range, gamma ~ 1 / scale^2 and the stable
    # descent gamma g_adv (about 1) do not.
    options, rho = _SCALE_VARIANTS["ssam_usam_adaptive"], 0.5
    grad = lambda ws: [scale * _H4 * ws[0]]
    ref, gamma, grad_norm, adv_norm = np_released_step(
        grad, [_W4], rho, "usam", True, True
    )
    assert adv_norm > 1e36  # its plain float32 sum of squares overflows
    loss = _scaled_quadratic(scale)
    w = jnp.asarray(_W4, jnp.float32)
    _, descent, info = _oracle(loss, rho=rho, **options)(w)
    chex.assert_tree_all_finite((descent, info.gamma))
    np.testing.assert_allclose(descent, ref[0], rtol=1e-5)
    np.testing.assert_allclose(info.gamma, gamma, rtol=1e-5)
    np.testing.assert_allclose(info.grad_norm, grad_norm, rtol=1e-5)
    if adv_norm > np.finfo(np.float32).max:
        assert np.isinf(info.adv_grad_norm)
    else:
        np.testing.assert_allclose(info.adv_grad_norm, adv_norm, rtol=1e-5)


_GRAD_VARIANTS = {**_SCALE_VARIANTS, "usam": {"perturbation": "usam"}}


def _descent_sum(variant, scale, rho=0.05, wrapper=False):
    """w -> sum of the descent gradient (oracle) or of -update (wrapper)."""
    options = _GRAD_VARIANTS[variant]
    loss = _scaled_quadratic(scale)
    if wrapper:
        opt = optax_wa.sharpness_aware(optax.sgd(1.0), rho=rho, **options)
        grad = jax.grad(loss)
        return lambda w: -jnp.sum(opt.update(grad(w), opt.init(w), w, grad_fn=grad)[0])
    oracle = optax_wa.sam_value_and_grad(loss, rho=rho, **options)
    return lambda w: jnp.sum(oracle(w)[1])


@pytest.mark.parametrize("wrapper", [False, True], ids=["oracle", "update"])
@pytest.mark.parametrize("variant", sorted(_GRAD_VARIANTS))
def test_jax_grad_at_zero_is_finite(variant, wrapper):
    # At w = 0 every norm is 0; the derivative of sqrt there is inf, and
    # inf * 0 would make the whole gradient NaN.
    options, rho, eps = _GRAD_VARIANTS[variant], 0.05, 1e-12
    got = jax.jit(jax.grad(_descent_sum(variant, 1.0, rho, wrapper)))(jnp.zeros(4))
    chex.assert_tree_all_finite(got)
    h = _H4
    if options.get("stable"):
        expected = 0.0 * h  # gamma = 0 and g_adv = 0 at w = 0
    elif options.get("adaptive"):
        expected = h  # T = |w| = 0: no perturbation to first order
    elif options["perturbation"] == "usam":
        expected = h + rho * h**2  # d = (H + rho H^2) w
    else:
        expected = h + rho * h**2 / eps  # the norm's derivative is 0 at 0
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("wrapper", [False, True], ids=["oracle", "update"])
@pytest.mark.parametrize("scale", [1e-20, 1e19, 1e30])
@pytest.mark.parametrize("variant", sorted(_GRAD_VARIANTS))
def test_jax_grad_at_extreme_scales(variant, scale, wrapper):
    # Away from eps's range (and with USAM's rho scaled by 1 / scale) the
    # descent is homogeneous: d_{s L}(w) = s d_L(w), and so is its derivative.
    options = _GRAD_VARIANTS[variant]
    w = jnp.asarray(_W4, jnp.float32)
    got = jax.jit(
        jax.grad(_descent_sum(variant, scale, _rho_for(options, scale), wrapper))
    )(w)
    chex.assert_tree_all_finite(got)
    if scale > 1.0:
        unit = jax.jit(jax.grad(_descent_sum(variant, 1.0, 0.05, wrapper)))(w)
        np.testing.assert_allclose(np.asarray(got) / scale, unit, rtol=1e-4)


# ---------------------------------------------------------------- hardening


@pytest.mark.parametrize(
    "factory, kwargs",
    [
        (optax_wa.sharpness_aware, {"rho": 0.1}),
        (optax_wa.ssam, {"rho": 0.1}),
        (optax_wa.ssam, {"rho": 0.3, "adaptive": True, "max_scale": 1.0}),
        (optax_wa.sharpness_aware, {"rho": optax.linear_schedule(0.0, 0.2, 2)}),
    ],
    ids=["sharpness_aware", "ssam", "ssam_asam_capped", "rho_schedule"],
)
def test_inject_hyperparams_under_jit_equals_plain(factory, kwargs):
    # Every numeric default (eps, adaptive_eta) is injected too and arrives
    # traced under jit; the results equal the plain factory's.
    grad = _nonlinear_grad
    injected = optax.inject_hyperparams(factory)(optax.sgd(0.1, momentum=0.9), **kwargs)
    plain = factory(optax.sgd(0.1, momentum=0.9), **kwargs)
    params = ref_params = _random_tree(6)
    state, ref_state = injected.init(params), plain.init(ref_params)
    assert {"rho", "eps", "adaptive_eta"} <= set(state.hyperparams)
    update = jax.jit(lambda g, s, p: injected.update(g, s, p, grad_fn=grad))
    for _ in range(3):
        updates, state = update(grad(params), state, params)
        ref_updates, ref_state = plain.update(
            grad(ref_params), ref_state, ref_params, grad_fn=grad
        )
        chex.assert_trees_all_close(updates, ref_updates, rtol=1e-5, atol=1e-7)
        params = optax.apply_updates(params, updates)
        ref_params = optax.apply_updates(ref_params, ref_updates)


def test_injected_out_of_range_values_are_clipped_at_zero():
    # Runtime values cannot be checked statically: rho, eps, adaptive_eta < 0
    # act as 0 (documented), never as a reversed ascent or a NaN.
    grad = _nonlinear_grad
    params = _random_tree(7)
    opt = optax.inject_hyperparams(optax_wa.ssam)(optax.sgd(0.1), rho=0.2)
    state = opt.init(params)
    state.hyperparams.update(rho=jnp.asarray(-0.2), eps=jnp.asarray(-1.0))
    got, _ = jax.jit(lambda g, s, p: opt.update(g, s, p, grad_fn=grad))(
        grad(params), state, params
    )
    # rho = 0: g_adv = g, gamma = 1 (eps = 0): the plain SGD update.
    expected = jax.tree.map(lambda g: -0.1 * g, grad(params))
    chex.assert_trees_all_close(got, expected, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stable": "no"},
        {"adaptive": 1},
        {"sync_ascent": "yes", "axis_name": "data"},
        {"has_aux": None},
        {"record_info": "false"},
    ],
    ids=["stable", "adaptive", "sync_ascent", "has_aux", "record_info"],
)
def test_non_bool_flags_raise(kwargs):
    (name,) = [k for k in kwargs if k != "axis_name"]
    with pytest.raises(TypeError, match=name):
        optax_wa.sharpness_aware(optax.sgd(0.1), **kwargs)


def test_bad_adv_norm_weight_raises():
    with pytest.raises(ValueError, match="adv_norm_weight"):
        optax_wa.ssam(optax.sgd(0.1), adaptive=True, adv_norm_weight="paper")


@pytest.mark.parametrize("rho", [0.0, 0.1])
def test_complex_params_are_rejected(rho):
    # The float32 accumulation would drop the imaginary part: with rho = 0 the
    # descent would be [2, -2] instead of the gradient [2 - 4j, -2 - 1j].
    loss = lambda w: jnp.sum(jnp.abs(w) ** 2)
    w = jnp.array([1.0 + 2.0j, -1.0 + 0.5j], jnp.complex64)
    with pytest.raises(TypeError, match="complex"):
        optax_wa.sam_value_and_grad(loss, rho=rho)(w)
    opt = optax_wa.ssam(optax.sgd(0.1), rho=rho)
    with pytest.raises(TypeError, match="complex"):
        opt.update(jax.grad(loss)(w), opt.init(w), w, grad_fn=jax.grad(loss))


def test_integer_params_are_rejected():
    opt = optax_wa.sharpness_aware(optax.sgd(0.1))
    w = jnp.array([1, 2])
    with pytest.raises(TypeError, match="floating"):
        opt.update(jnp.ones(2), opt.init(w), w, grad_fn=lambda p: jnp.ones(2))


def test_has_aux_mismatch_in_the_oracle_raises():
    w = jnp.array([1.0, 2.0])
    with pytest.raises(ValueError, match="has_aux=True"):
        optax_wa.sam_value_and_grad(lambda p: (jnp.sum(p**2), {"n": 1}))(w)
    with pytest.raises(ValueError, match="has_aux=True"):
        optax_wa.sam_value_and_grad(lambda p: jnp.sum(p**2), has_aux=True)(w)


def test_has_aux_mismatch_in_the_wrapper_raises():
    params = _random_tree(0)
    grad = _nonlinear_grad
    plain = optax_wa.ssam(optax.sgd(0.1))
    with pytest.raises(ValueError, match="has_aux=True"):
        plain.update(
            grad(params), plain.init(params), params, grad_fn=lambda p: (grad(p), 1.0)
        )
    with_aux = optax_wa.ssam(optax.sgd(0.1), has_aux=True)
    with pytest.raises(ValueError, match="has_aux=True"):
        with_aux.update(grad(params), with_aux.init(params), params, grad_fn=grad)
    # A 2-tuple of params is not mistaken for (grads, aux).
    pair = (jnp.array([0.5, -1.0]), jnp.array([2.0]))
    pair_grad = jax.grad(lambda p: _nonlinear_loss(list(p)))
    updates, _ = plain.update(
        pair_grad(pair), plain.init(pair), pair, grad_fn=pair_grad
    )
    assert jax.tree.structure(updates) == jax.tree.structure(pair)
