"""Largest stable learning rate of the SAM family on a quadratic.

L(w) = 1/2 w^T diag(lambda) w with lambda geometric in [0.1, 10] (d = 10,
lambda_max = 10), w_0 = (1, ..., 1), plain gradient descent on each method's
descent gradient (``optax_wa.sam_value_and_grad``). A run is stable when w
stays finite and does not grow in the second half of the run:
||w_T|| <= 2 max(||w_{T/2}||, ||w_0||) (a growth rate above 1.0002 per step is
caught with T = 8000). The table gives the largest lr of a grid (spacing
``--lr-step``, offset by half a step so that no grid point sits exactly on a
predicted limit) below which every grid lr is stable, next to the predicted
limits:

* GD: 2 / lambda_max.
* USAM: w <- (I - lr (H + rho H^2)) w is linear, stable iff
  lr < 2 / (lambda (1 + rho lambda)) for every eigenvalue.
* SSAM(USAM): the descent is rescaled to ||g||; along one eigenvector it is
  exactly lambda w (gradient descent), so the limit is 2 / lambda_max.
* SAM and SSAM(SAM): along the top eigenvector, SAM is
  w <- (1 - lr lambda) w - lr lambda rho sign(w), which stays bounded iff
  lr lambda < 2; SSAM(SAM) is exactly gradient descent there. Predicted
  2 / lambda_max (a 1-D analysis).

Run: ``python benchmarks/sharpness_quadratic.py`` (about a minute on a 2-core
CPU); ``--smoke`` for two rhos, a coarse grid and 200 steps (the same table).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import optax_wa

METHODS = {
    "GD": None,
    "SAM": {"perturbation": "sam"},
    "SSAM(SAM)": {"perturbation": "sam", "stable": True},
    "USAM": {"perturbation": "usam"},
    "SSAM(USAM)": {"perturbation": "usam", "stable": True},
}


def largest_stable_lr(options, eigenvalues, rhos, lrs, num_steps):
    """Largest grid lr below which all grid lrs are stable, one per rho."""
    h = jnp.asarray(eigenvalues, jnp.float32)
    loss = lambda w: 0.5 * jnp.sum(h * w**2)
    w0 = jnp.ones_like(h)

    def run(rho, lr):
        if options is None:
            direction = jax.grad(loss)
        else:
            oracle = optax_wa.sam_value_and_grad(loss, rho=rho, **options)
            direction = lambda w: oracle(w)[1]

        def step(w, _):
            return w - lr * direction(w), None

        half = num_steps // 2
        w_half, _ = jax.lax.scan(step, w0, None, length=half)
        w, _ = jax.lax.scan(step, w_half, None, length=num_steps - half)
        norm = jnp.linalg.norm(w)
        reference = jnp.maximum(jnp.linalg.norm(w_half), jnp.linalg.norm(w0))
        return jnp.isfinite(norm) & (norm <= 2.0 * reference)

    grid = jax.jit(jax.vmap(jax.vmap(run, in_axes=(None, 0)), in_axes=(0, None)))
    stable = np.asarray(
        grid(jnp.asarray(rhos, jnp.float32), jnp.asarray(lrs, jnp.float32))
    )
    out = []
    for row in stable:
        first_unstable = np.argmin(row) if not row.all() else len(row)
        out.append(lrs[first_unstable - 1] if first_unstable > 0 else float("nan"))
    return np.array(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rhos", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.2, 0.5]
    )
    parser.add_argument("--lr-step", type=float, default=0.0005)
    parser.add_argument("--lr-max", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="two rhos, a coarse lr grid, 200 steps; the same table",
    )
    args = parser.parse_args()
    if args.smoke:
        args.rhos, args.lr_step, args.steps = [0.05, 0.5], 0.005, 200

    eigenvalues = np.geomspace(0.1, 10.0, 10)
    lam = eigenvalues.max()
    lrs = np.arange(args.lr_step, args.lr_max + 1e-12, args.lr_step) - args.lr_step / 2
    rhos = np.asarray(args.rhos)
    start = time.perf_counter()
    measured = {
        name: largest_stable_lr(options, eigenvalues, rhos, lrs, args.steps)
        for name, options in METHODS.items()
    }
    elapsed = time.perf_counter() - start
    predicted_gd = 2.0 / lam
    predicted_usam = 2.0 / (lam * (1.0 + rhos * lam))

    print(
        f"quadratic d=10, lambda in [0.1, 10] (lambda_max={lam:g}), {args.steps} steps, "
        f"lr grid step {args.lr_step:g}; measured (predicted)"
    )
    header = f"{'rho':>5} | " + " | ".join(f"{name:>19}" for name in METHODS)
    print(header)
    print("-" * len(header))
    for i, rho in enumerate(rhos):
        cells = []
        for name in METHODS:
            pred = predicted_usam[i] if name == "USAM" else predicted_gd
            cells.append(f"{measured[name][i]:.5f} ({pred:.5f})".rjust(19))
        print(f"{rho:>5g} | " + " | ".join(cells))
    ratio = measured["SSAM(USAM)"] / measured["USAM"]
    print(
        "SSAM(USAM) / USAM largest stable lr: " + ", ".join(f"{r:.2f}" for r in ratio)
    )
    print(f"({elapsed:.1f} s)")


if __name__ == "__main__":
    main()
