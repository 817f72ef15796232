"""Compile time of WASH's update against the bare vmapped inner optimizer.

Time to the first step, update alone: ``jax.jit(opt.update).lower(...)``
then ``.compile()`` (trace + lower, and XLA compile, timed apart) on a
stacked tree of ``--leaves`` small tensors (shapes cycling through a conv
kernel, a dense kernel and a bias) with ``--members`` members, SGD with
momentum. Each optimizer is compiled once in a fresh ``jax.jit`` (no cache
shared between rows). The ratio to the bare optimizer is what grows with
the leaf count today: the exchange runs per tensor.

Run: ``python benchmarks/wash_compile.py [--leaves 600] [--members 4]``;
``--smoke``: 12 leaves, the same table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "--smoke" in sys.argv:
    # Compiling dominates a smoke run: skip LLVM's optimizations.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import optax_wa  # noqa: E402
from optax_wa import members  # noqa: E402

SHAPES = ((3, 3, 8, 8), (32, 16), (16,))


def tree(num_leaves, num_members):
    return {
        f"t{i:04d}": jnp.zeros((num_members, *SHAPES[i % len(SHAPES)]))
        for i in range(num_leaves)
    }


def compile_time(opt, params):
    state = opt.init(params)
    start = time.perf_counter()
    lowered = jax.jit(opt.update).lower(params, state, params)
    traced = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    return traced, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--leaves", type=int, default=600)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="tiny settings")
    args = parser.parse_args()
    if args.smoke:
        args.leaves = 12
    params = tree(args.leaves, args.members)
    inner = optax.sgd(0.1, momentum=0.9)
    opts = {
        "inner (vmapped sgd+momentum)": members.per_member(inner),
        "wash p=0.01": optax_wa.wash(inner, shuffle_prob=0.01),
        "wash p=0.01 +opt state": optax_wa.wash(
            inner, shuffle_prob=0.01, shuffle_opt_state=True
        ),
    }
    print(
        f"{args.leaves} leaves x {args.members} members; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print("| update | trace+lower s | compile s | total s | ratio |")
    print("|---|---|---|---|---|")
    base = None
    for name, opt in opts.items():
        traced, compiled = compile_time(opt, params)
        total = traced + compiled
        base = base or total
        print(
            f"| {name} | {traced:.2f} | {compiled:.2f} | {total:.2f} | {total / base:.1f} |"
        )


if __name__ == "__main__":
    main()
