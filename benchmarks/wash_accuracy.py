"""WASH on MNIST-1D: the averaged model against independent members and PAPA.

4 members, each an MLP 40-128-128-10 (ReLU), trained as one stacked
ensemble with SGD (momentum 0.9, lr 0.05 cosine-decayed, weight decay 5e-4,
batch 64 per member, each member on its own data order) for ``--steps``
steps, 3 seeds. Methods:

* **independent**: the per-member optimizer alone;
* **PAPA**: ``optax_wa.papa(inner, alpha=0.99, period=10)``;
* **WASH**: ``optax_wa.wash(inner, shuffle_prob=p, depth_order=[layer 0,
  layer 1, layer 2])`` (linear depth schedule: the output layer is never
  shuffled) for every ``p`` of ``--shuffle-probs`` (default 0.003 and 0.01),
  and WASH+Opt (``shuffle_opt_state=True``) at the last ``p``.

Members start from different initializations (``--init different``, the
setting where a plain weight average fails) or from one
(``--init same``). For every method and seed the test accuracy (%) of: the
members (mean), the logit ensemble (mean of the members' logits) and the
averaged model (uniform average of the weights, one network).

The paper's claim: WASH's averaged model is far above the average of
independently trained members and close to its own ensemble.

Data: MNIST-1D generated locally (``mnist1d.data.make_dataset`` with
``get_dataset_args()``: 4000 train / 1000 test signals of length 40).

Run: ``python benchmarks/wash_accuracy.py`` (about 5 minutes on 2 cores);
``--smoke``: 20 steps, one seed, one ``p``, one init, the same table.
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
from optax_wa import members  # noqa: E402

MEMBERS = 4
SIZES = (40, 128, 128, 10)
BATCH = 64


def load_mnist1d():
    data = make_dataset(get_dataset_args())
    mean, std = data["x"].mean(), data["x"].std()
    norm = lambda x: jnp.asarray((x - mean) / std, jnp.float32)
    return (norm(data["x"]), jnp.asarray(data["y"])), (
        norm(data["x_test"]),
        jnp.asarray(data["y_test"]),
    )


def init_mlp(key):
    keys = jax.random.split(key, len(SIZES) - 1)
    he = jax.nn.initializers.he_normal()
    return {
        f"layer_{i}": {
            "w": he(k, (m, n), jnp.float32),
            "b": jnp.zeros((n,), jnp.float32),
        }
        for i, (k, m, n) in enumerate(zip(keys, SIZES[:-1], SIZES[1:]))
    }


DEPTH_ORDER = [f"layer_{i}" for i in range(len(SIZES) - 1)]


def logits_fn(params, x):
    for i in range(len(SIZES) - 2):
        x = jax.nn.relu(x @ params[f"layer_{i}"]["w"] + params[f"layer_{i}"]["b"])
    last = params[f"layer_{len(SIZES) - 2}"]
    return x @ last["w"] + last["b"]


def loss_fn(params, x, y):
    logits = logits_fn(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_optimizer(method, steps):
    schedule = optax.cosine_decay_schedule(0.05, steps)
    inner = optax.chain(
        optax.add_decayed_weights(5e-4), optax.sgd(schedule, momentum=0.9)
    )
    if method == "independent":
        return members.per_member(inner)
    if method == "papa":
        return optax_wa.papa(inner, alpha=0.99, period=10)
    name, _, p = method.partition(" p=")
    if name in ("wash", "wash+opt"):
        return optax_wa.wash(
            inner,
            shuffle_prob=float(p),
            depth_order=DEPTH_ORDER,
            shuffle_opt_state=name == "wash+opt",
        )
    raise ValueError(method)


def train(method, seed, init, steps, train_data, test_data):
    x, y = train_data
    key = jax.random.key(seed)
    init_key, data_key = jax.random.split(key)
    params = members.init_members(init_mlp, init_key, MEMBERS, same_init=init == "same")
    opt = make_optimizer(method, steps)
    state = opt.init(params)
    grad = jax.vmap(jax.grad(loss_fn))
    n = x.shape[0]
    per_epoch = n // BATCH

    def epoch_orders(k):  # every member its own data order
        keys = jax.random.split(k, MEMBERS)
        return jax.vmap(lambda kk: jax.random.permutation(kk, n)[: per_epoch * BATCH])(
            keys
        )

    @jax.jit
    def run(params, state, data_key):
        def step(carry, t):
            params, state, order = carry
            epoch_key = jax.random.fold_in(data_key, t // per_epoch)
            order = jax.lax.cond(
                t % per_epoch == 0, lambda: epoch_orders(epoch_key), lambda: order
            )
            idx = jax.lax.dynamic_slice_in_dim(order, (t % per_epoch) * BATCH, BATCH, 1)
            grads = grad(params, x[idx], y[idx])
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state, order), None

        order = jnp.zeros((MEMBERS, per_epoch * BATCH), jnp.int32)
        (params, state, _), _ = jax.lax.scan(
            step, (params, state, order), jnp.arange(steps)
        )
        return params

    params = run(params, state, data_key)
    xt, yt = test_data
    logits = jax.vmap(logits_fn, in_axes=(0, None))(params, xt)
    acc = lambda lg: float(100 * jnp.mean(jnp.argmax(lg, -1) == yt))
    return {
        "members": float(np.mean([acc(lg) for lg in logits])),
        "ensemble": acc(logits.mean(0)),
        "average": acc(logits_fn(members.average_members(params), xt)),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shuffle-probs", type=float, nargs="+", default=[0.003, 0.01])
    parser.add_argument("--init", choices=["different", "same", "both"], default="both")
    parser.add_argument("--smoke", action="store_true", help="tiny settings")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.seeds, args.shuffle_probs, args.init = 20, [0], [0.01], "same"
    methods = ["independent", "papa"] + [f"wash p={p:g}" for p in args.shuffle_probs]
    methods.append(f"wash+opt p={args.shuffle_probs[-1]:g}")
    train_data, test_data = load_mnist1d()
    inits = ["different", "same"] if args.init == "both" else [args.init]
    print(
        f"MNIST-1D {train_data[0].shape[0]} train / {test_data[0].shape[0]} test; "
        f"{MEMBERS} members MLP {'-'.join(map(str, SIZES))}; {args.steps} steps, "
        f"batch {BATCH}/member; WASH linear depth schedule; seeds {args.seeds}"
    )
    start = time.time()
    table = {}
    for init in inits:
        for method in methods:
            runs = [
                train(method, s, init, args.steps, train_data, test_data)
                for s in args.seeds
            ]
            table[(init, method)] = runs
            print(
                f"  {init:9s} {method:16s} "
                + "  ".join(
                    f"seed {s}: mem {r['members']:.1f} ens {r['ensemble']:.1f} "
                    f"avg {r['average']:.1f}"
                    for s, r in zip(args.seeds, runs)
                ),
                flush=True,
            )
    print(
        f"\ntest accuracy (%), mean +- std over {len(args.seeds)} seeds "
        f"({time.time() - start:.0f} s)"
    )
    print(
        "| init | method | members | logit ensemble | averaged model | "
        "ensemble - average |"
    )
    print("|---|---|---|---|---|---|")
    for (init, method), runs in table.items():
        cell = lambda key, runs=runs: (
            f"{np.mean([r[key] for r in runs]):.1f} +- {np.std([r[key] for r in runs]):.1f}"
        )
        gap = [r["ensemble"] - r["average"] for r in runs]
        print(
            f"| {init} | {method} | {cell('members')} | {cell('ensemble')} | "
            f"{cell('average')} | {np.mean(gap):.1f} |"
        )


if __name__ == "__main__":
    main()
