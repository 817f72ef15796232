"""Step time of SAM / SSAM against SGD and against ``optax.contrib.sam``.

One jitted training step per method on the same MLP (40 -> 512 -> 512 -> 10,
batch 256, SGD momentum 0.9), timed side by side in one process: the methods
are interleaved, each timed over ``--steps`` steps per round, and the median
and minimum over ``--rounds`` rounds are reported, with XLA's cost analysis
(flops, bytes accessed) of each compiled step. Methods:

* ``sgd``: ``jax.value_and_grad`` + ``optax.sgd``.
* ``sam`` / ``ssam``: ``optax_wa.sam_value_and_grad`` (stable for SSAM) +
  ``optax.sgd``.
* ``sam_wrapper``: ``jax.value_and_grad`` + ``optax_wa.sharpness_aware``
  with ``grad_fn``; ``sam_wrapper_lean``: the same with ``record_info=False``
  (no diagnostics in the state, so XLA skips the norm of the ascent gradient).
* ``optax_sam``: ``jax.value_and_grad`` + ``optax.contrib.sam(...,
  opaque_mode=True)`` with the same normalized ascent (sync_period=2).

Two gradient evaluations are the floor of a SAM step, so the target of
SAM / SGD is <= 2.1; the target of ours / optax is <= 1.0.

Run: ``python benchmarks/sharpness_speed.py`` (under a minute on a 2-core CPU);
``--smoke`` for a few-second run with tiny settings (same table).
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

import optax_wa  # noqa: E402

RHO = 0.05


def init_mlp(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    he = jax.nn.initializers.he_normal()
    return [
        {"w": he(k, (m, n), jnp.float32), "b": jnp.zeros((n,), jnp.float32)}
        for k, m, n in zip(keys, sizes[:-1], sizes[1:])
    ]


def loss_fn(params, x, y):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    logits = x @ params[-1]["w"] + params[-1]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_steps():
    sgd = optax.sgd(0.05, momentum=0.9)

    def sgd_step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = sgd.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    def oracle_step(stable):
        oracle = optax_wa.sam_value_and_grad(loss_fn, rho=RHO, stable=stable)

        def step(params, state, x, y):
            (loss, _), grads, _ = oracle(params, x, y)
            updates, state = sgd.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        return step

    def grad_fn_step(opt, with_index):
        """A step of a wrapper taking ``grad_fn(p)`` (ours) or ``grad_fn(p, i)`` (optax)."""

        def step(params, state, x, y):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            grad = lambda p: jax.grad(loss_fn)(p, x, y)
            grad_fn = (lambda p, _: grad(p)) if with_index else grad
            updates, state = opt.update(grads, state, params, grad_fn=grad_fn)
            return optax.apply_updates(params, updates), state, loss

        return step

    ours = optax_wa.sharpness_aware(optax.sgd(0.05, momentum=0.9), rho=RHO)
    lean = optax_wa.sharpness_aware(
        optax.sgd(0.05, momentum=0.9), rho=RHO, record_info=False
    )
    theirs = optax.contrib.sam(
        optax.sgd(0.05, momentum=0.9),
        optax.chain(optax.contrib.normalize(), optax.sgd(RHO)),
        sync_period=2,
        opaque_mode=True,
    )
    return {
        "sgd": (sgd_step, sgd),
        "sam": (oracle_step(False), sgd),
        "ssam": (oracle_step(True), sgd),
        "sam_wrapper": (grad_fn_step(ours, with_index=False), ours),
        "sam_wrapper_lean": (grad_fn_step(lean, with_index=False), lean),
        "optax_sam": (grad_fn_step(theirs, with_index=True), theirs),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny settings (2 rounds x 2 steps, width 32, batch 16): checks the "
        "script runs and prints its table, in a few seconds",
    )
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.steps, args.width, args.batch = 2, 2, 32, 16

    sizes = [40, args.width, args.width, 10]
    key = jax.random.key(0)
    params0 = init_mlp(key, sizes)
    x = jax.random.normal(jax.random.fold_in(key, 1), (args.batch, 40))
    y = jax.random.randint(jax.random.fold_in(key, 2), (args.batch,), 0, 10)

    runners, costs = {}, {}
    for name, (step, opt) in make_steps().items():
        jitted = jax.jit(step, donate_argnums=(0, 1))
        params = jax.tree.map(jnp.copy, params0)
        state = opt.init(params)
        cost = jitted.lower(params, state, x, y).compile().cost_analysis()
        costs[name] = (
            cost.get("flops", float("nan")),
            cost.get("bytes accessed", float("nan")),
        )
        params, state, loss = jitted(params, state, x, y)  # compile + warm up
        jax.block_until_ready(loss)
        runners[name] = [jitted, params, state]

    times = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            jitted, params, state = runner
            start = time.perf_counter()
            for _ in range(args.steps):
                params, state, loss = jitted(params, state, x, y)
            jax.block_until_ready((params, state, loss))
            times[name].append((time.perf_counter() - start) / args.steps)
            runner[1], runner[2] = params, state
    median = {name: float(np.median(t)) for name, t in times.items()}
    best = {name: float(np.min(t)) for name, t in times.items()}

    print(
        f"MLP 40-{args.width}-{args.width}-10, batch {args.batch}, {args.rounds} "
        f"interleaved rounds x {args.steps} steps, median step time"
    )
    for name, value in median.items():
        flops, nbytes = costs[name]
        print(
            f"  {name:>16}: {1e3 * value:8.3f} ms  (min {1e3 * best[name]:.3f} ms)  "
            f"XLA cost: {flops / 1e6:.1f} MFLOP, {nbytes / 1e6:.2f} MB accessed"
        )
    ratios = [
        ("SAM step / SGD step", "sam", "sgd", 2.1),
        ("SSAM step / SGD step", "ssam", "sgd", 2.1),
        ("SAM wrapper step / SGD step", "sam_wrapper", "sgd", 2.1),
        ("our SAM / optax.contrib.sam", "sam", "optax_sam", 1.0),
        ("our SAM wrapper / optax sam", "sam_wrapper", "optax_sam", 1.0),
        ("wrapper, record_info=False", "sam_wrapper_lean", "optax_sam", 1.0),
    ]
    print(
        "ratio: median over rounds of the per-round ratio [25th, 75th percentile]; "
        "ratio of minima in parentheses"
    )
    for label, num, den, target in ratios:
        paired = np.asarray(times[num]) / np.asarray(times[den])
        low, mid, high = np.percentile(paired, [25, 50, 75])
        print(
            f"  {label:<28}: {mid:.3f} [{low:.3f}, {high:.3f}]  "
            f"({best[num] / best[den]:.3f})  target <= {target}"
        )


if __name__ == "__main__":
    main()
