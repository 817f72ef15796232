"""Flax NNX: ``nnx.Optimizer`` drives every method (the recipes of docs/nnx.md).

Each NNX run is checked against an independent path: the plain optax API on
the arrays of the model (``tx.init`` / ``tx.update`` / ``apply_updates``),
with gradients from ``jax.grad`` (per member under ``jax.vmap``) or from the
pure SAM oracle ``optax_wa.sam_value_and_grad``.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_wa

M = 4  # ensemble members


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(4, 8, rngs=rngs)
        self.l2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.tanh(self.l1(x)))


def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _data(members=None):
    shape = (16,) if members is None else (members, 16)
    x = jax.random.normal(jax.random.key(1), (*shape, 4))
    y = jnp.arange(int(np.prod(shape))).reshape(shape) % 3
    return x, y


def _pure(model):
    """The model's parameters as a plain pytree of arrays."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


# --- SAM / Stable SAM with grad_fn on one NNX model -------------------------


def sam_train_step(model, optimizer, x, y):
    """One NNX step of ``sharpness_aware``: the recipe of docs/nnx.md."""
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def grad_fn(params):  # the gradient at other params, same batch
        return jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), x, y))(params)

    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads, grad_fn=grad_fn)
    return loss


@pytest.mark.parametrize("stable", [False, True])
def test_sharpness_aware_on_nnx_model_takes_the_oracle_step(stable):
    x, y = _data()
    lr, rho = 0.3, 0.05
    model = MLP(nnx.Rngs(0))
    start = _pure(model)
    tx = optax_wa.sharpness_aware(optax.sgd(lr), rho=rho, stable=stable)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    step = nnx.jit(sam_train_step)
    step(model, optimizer, x, y)

    # Independent path: the pure oracle on a function of plain arrays.
    graphdef, _, rest = nnx.split(MLP(nnx.Rngs(0)), nnx.Param, ...)

    def pure_loss(p):
        model = nnx.merge(graphdef, nnx.State(p), rest)
        return loss_fn(model, x, y)

    oracle = optax_wa.sam_value_and_grad(pure_loss, rho=rho, stable=stable)
    _, descent, info = oracle(start)
    want = jax.tree.map(lambda p, g: p - lr * g, start, descent)
    chex.assert_trees_all_close(_pure(model), want, rtol=1e-5, atol=1e-6)
    # The SAM step differs from a plain gradient step (the test can fail).
    plain = jax.tree.map(lambda p, g: p - lr * g, start, jax.grad(pure_loss)(start))
    gap = max(
        jax.tree.leaves(jax.tree.map(lambda a, b: jnp.abs(a - b).max(), want, plain))
    )
    assert gap > 1e-4
    assert float(info.grad_norm) > 0

    losses = [float(step(model, optimizer, x, y)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]


# --- an nnx.vmap ensemble trained with lookaround, papa, wash ---------------


@nnx.split_rngs(splits=M)
@nnx.vmap(in_axes=0, out_axes=0)
def create_ensemble(rngs: nnx.Rngs):
    return MLP(rngs)


def ensemble_loss(ensemble, x, y):
    """Sum of the members' losses, each on its own batch (x: (M, B, 4))."""

    @nnx.vmap(in_axes=(0, 0, 0))
    def member_loss(model, x, y):
        return loss_fn(model, x, y)

    return member_loss(ensemble, x, y).sum()


METHODS = {
    "lookaround": lambda: optax_wa.lookaround(
        optax.sgd(0.1, momentum=0.9), sync_period=2
    ),
    "papa": lambda: optax_wa.papa(optax.sgd(0.1), alpha=0.5, period=2),
    "wash": lambda: optax_wa.wash(
        optax.sgd(0.1), shuffle_prob=0.5, depth_order=["l1", "l2"], seed=3
    ),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_nnx_vmap_ensemble_matches_plain_optax(name):
    x, y = _data(M)
    ensemble = create_ensemble(nnx.Rngs(0))
    start = _pure(ensemble)
    assert start["l1"]["kernel"].shape == (M, 4, 8)
    optimizer = nnx.Optimizer(ensemble, METHODS[name](), wrt=nnx.Param)

    @nnx.jit
    def train_step(ensemble, optimizer, x, y):
        loss, grads = nnx.value_and_grad(ensemble_loss)(ensemble, x, y)
        optimizer.update(ensemble, grads)
        return loss

    # Independent path: plain optax on the stacked arrays, per-member
    # gradients by jax.vmap of jax.grad on one member's model.
    graphdef, _ = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)

    def member_loss(p, x, y):
        return loss_fn(nnx.merge(graphdef, nnx.State(p)), x, y)

    tx = METHODS[name]()
    params, state = start, tx.init(start)
    for _ in range(4):
        train_step(ensemble, optimizer, x, y)
        grads = jax.vmap(jax.grad(member_loss))(params, x, y)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        chex.assert_trees_all_close(_pure(ensemble), params, rtol=1e-5, atol=1e-6)

    moved = jax.tree.map(lambda a, b: jnp.abs(a - b).max(), params, start)
    assert max(jax.tree.leaves(moved)) > 1e-3
    spread = jax.tree.map(lambda a: jnp.abs(a - a[:1]).max(), params)
    if name == "lookaround":  # 4 steps, synced every 2: all members equal
        # (up to the rounding of params + (mean - params))
        assert max(jax.tree.leaves(spread)) < 1e-6
    else:  # papa pulls with alpha 0.5 and wash swaps: members stay distinct
        assert max(jax.tree.leaves(spread)) > 1e-3
