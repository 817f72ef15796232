"""SAM family on MNIST-1D: test accuracy and median gamma across learning rates.

An MLP (40 -> 64 -> 64 -> 10, ReLU) trained with SGD momentum 0.9 (EMA form:
``lr`` is the effective step size, see ``sgd_ema_momentum``) on minibatches
of 128 for ``--steps`` steps (default 2000), lr in {0.1, 0.5, 1.0, 1.5}, 3 seeds, for SGD,
SAM, SSAM(SAM), USAM and SSAM(USAM) (``optax_wa.sam_value_and_grad`` in front
of ``optax.sgd``). For a seed, every method sees the same initialization and
the same batches. Printed per method and lr: mean +- std of the final test
accuracy over seeds, how many seeds diverged (non-finite params), and the
median over steps and seeds of gamma = ||g|| / ||g_adv|| (for SAM and USAM the
factor SSAM would have applied).

Data: MNIST-1D generated locally from the ``mnist1d`` package's templates
(4000 train / 1000 test sequences of length 40; nothing is downloaded).

Run: ``python benchmarks/sharpness_mnist1d.py`` (about 2 minutes on a 2-core
CPU); ``--smoke`` for 20 steps and one seed (the same table).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "--smoke" in sys.argv:
    # Compiling dominates a smoke run: skip LLVM's optimizations.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from mnist1d.data import get_dataset_args, make_dataset  # noqa: E402

import optax_wa  # noqa: E402

LEARNING_RATES = (0.1, 0.5, 1.0, 1.5)
SEEDS = (0, 1, 2)
BATCH = 128
WIDTH = 64


def load_mnist1d():
    data = make_dataset(get_dataset_args())
    as_f32 = lambda a: jnp.asarray(a, jnp.float32)
    return (as_f32(data["x"]), jnp.asarray(data["y"])), (
        as_f32(data["x_test"]),
        jnp.asarray(data["y_test"]),
    )


def init_mlp(key):
    sizes = [40, WIDTH, WIDTH, 10]
    keys = jax.random.split(key, len(sizes) - 1)
    he = jax.nn.initializers.he_normal()
    return [
        {"w": he(k, (m, n), jnp.float32), "b": jnp.zeros((n,), jnp.float32)}
        for k, m, n in zip(keys, sizes[:-1], sizes[1:])
    ]


def logits_fn(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def loss_fn(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_fn(params, x), y
    ).mean()


def sgd_ema_momentum(learning_rate, momentum=0.9):
    """SGD with momentum averaged as an EMA (dampening = momentum).

    m <- 0.9 m + 0.1 d, w <- w - lr m: ``learning_rate`` is the effective
    step size (heavy-ball ``optax.sgd(lr, momentum=0.9)`` would step 10x lr).
    """
    return optax.chain(
        optax.ema(momentum, debias=False), optax.scale_by_learning_rate(learning_rate)
    )


def train(options, train_data, test_data, steps, seeds=SEEDS):
    """Final test accuracy, finiteness and median gamma for every (lr, seed)."""
    x_train, y_train = train_data
    x_test, y_test = test_data
    oracle = (
        None if options is None else optax_wa.sam_value_and_grad(loss_fn, **options)
    )

    def run(lr, seed):
        key = jax.random.key(seed)
        params = init_mlp(jax.random.fold_in(key, 0))
        data_key = jax.random.fold_in(key, 1)
        opt = sgd_ema_momentum(lr)

        def step(carry, t):
            params, state = carry
            idx = jax.random.randint(
                jax.random.fold_in(data_key, t), (BATCH,), 0, x_train.shape[0]
            )
            xb, yb = x_train[idx], y_train[idx]
            if oracle is None:
                grads = jax.grad(loss_fn)(params, xb, yb)
                gamma = jnp.nan
            else:
                _, grads, info = oracle(params, xb, yb)
                gamma = info.gamma
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), gamma

        (params, _), gammas = jax.lax.scan(
            step, (params, opt.init(params)), jnp.arange(steps)
        )
        accuracy = jnp.mean(jnp.argmax(logits_fn(params, x_test), -1) == y_test)
        finite = jnp.all(
            jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)])
        )
        return accuracy, finite, gammas

    grid = jax.jit(jax.vmap(jax.vmap(run, in_axes=(None, 0)), in_axes=(0, None)))
    accuracy, finite, gammas = grid(
        jnp.asarray(LEARNING_RATES, jnp.float32), jnp.asarray(seeds)
    )
    return np.asarray(accuracy), np.asarray(finite), np.asarray(gammas)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rho-sam", type=float, default=0.05)
    parser.add_argument("--rho-usam", type=float, default=0.5)
    parser.add_argument(
        "--smoke", action="store_true", help="20 steps, one seed, the same table"
    )
    args = parser.parse_args()
    seeds = SEEDS
    if args.smoke:
        args.steps, seeds = 20, SEEDS[:1]
    methods = {
        "SGD": None,
        "SAM": {"rho": args.rho_sam},
        "SSAM(SAM)": {"rho": args.rho_sam, "stable": True},
        "USAM": {"rho": args.rho_usam, "perturbation": "usam"},
        "SSAM(USAM)": {"rho": args.rho_usam, "perturbation": "usam", "stable": True},
    }
    train_data, test_data = load_mnist1d()
    print(
        f"MNIST-1D MLP 40-{WIDTH}-{WIDTH}-10, SGD EMA momentum 0.9, batch {BATCH}, "
        f"{args.steps} steps, seeds {seeds}, rho SAM={args.rho_sam:g}, "
        f"rho USAM={args.rho_usam:g}"
    )
    print(
        "cells: test accuracy mean +- std over seeds [diverged seeds] gamma=median gamma"
    )
    header = f"{'method':>11} | " + " | ".join(f"lr={lr:<33g}" for lr in LEARNING_RATES)
    print(header)
    print("-" * len(header))
    start = time.perf_counter()
    for name, options in methods.items():
        accuracy, finite, gammas = train(
            options, train_data, test_data, args.steps, seeds
        )
        cells = []
        for i in range(len(LEARNING_RATES)):
            acc = 100.0 * accuracy[i]
            diverged = int(np.sum(~finite[i]))
            gamma = np.nanmedian(gammas[i]) if options is not None else float("nan")
            gamma_text = "    -" if np.isnan(gamma) else f"{gamma:.3f}"
            cells.append(
                f"{acc.mean():5.1f} +- {acc.std():4.1f} [{diverged}] gamma={gamma_text}".ljust(
                    36
                )
            )
        print(f"{name:>11} | " + " | ".join(cells), flush=True)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
