"""The main job: every method of the library side by side on MNIST-1D.

Trains an ensemble of ``--members`` small 1-D CNNs with each method, every
member on its own data order and its own augmentation (three policies,
assigned round-robin), and reports

* the mean test accuracy of the members,
* the accuracy of the logit ensemble (mean of the members' logits),
* the accuracy of the averaged model (uniform average of the weights),
* the step time relative to independent SGD members, measured in this run.

Writes ``results.json`` and ``accuracy.png`` (test accuracy over training)
to ``--out``. Runs on MNIST-1D generated locally (no download)::

    python examples/compare.py                       # all methods, < 10 min on 2 cores
    python examples/compare.py --methods sgd lookaround --steps 500
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mnist1d_setup as setup  # noqa: E402

import optax_wa  # noqa: E402
from optax_wa import members  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    members: int = 4
    steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    channels: int = 32
    eval_every: int = 250
    seed: int = 0
    rho: float = 0.05
    shuffle_prob: float = 0.01


@dataclasses.dataclass(frozen=True)
class Method:
    """How a method trains the stacked ensemble.

    ``optimizer(inner)`` wraps the per-member SGD; ``grad_oracle(loss_fn)``
    (optional) replaces ``jax.grad`` for one member (SAM family);
    ``same_init`` starts every member from one point (Lookaround's rule),
    otherwise each member has its own initialization.
    """

    description: str
    optimizer: Callable[
        [optax.GradientTransformation, Config], optax.GradientTransformation
    ]
    grad_oracle: Callable[[Callable, Config], Callable] | None = None
    same_init: bool = False


METHODS: dict[str, Method] = {
    "sgd": Method(
        "independent members (SGD momentum)",
        lambda inner, cfg: members.per_member(inner),
    ),
    "lookaround": Method(
        "Lookaround, sync every 5 steps",
        lambda inner, cfg: optax_wa.lookaround(inner, sync_period=5),
        same_init=True,
    ),
    "papa": Method(
        "PAPA, alpha 0.99 every 10 steps",
        lambda inner, cfg: optax_wa.papa(inner, alpha=0.99, period=10),
    ),
    "wash": Method(
        "WASH, p 0.01 linear in depth, optimizer state shuffled too",
        lambda inner, cfg: optax_wa.wash(
            inner,
            shuffle_prob=cfg.shuffle_prob,
            layer_probs="linear",
            depth_order=["conv1", "conv2", "conv3", "head"],
            shuffle_opt_state=True,
            seed=cfg.seed,
        ),
        same_init=True,
    ),
    "sam": Method(
        "independent members, SAM gradients (rho 0.05)",
        lambda inner, cfg: members.per_member(inner),
        grad_oracle=lambda loss_fn, cfg: _sam_grad(loss_fn, cfg, stable=False),
    ),
    "ssam": Method(
        "independent members, Stable SAM gradients (rho 0.05)",
        lambda inner, cfg: members.per_member(inner),
        grad_oracle=lambda loss_fn, cfg: _sam_grad(loss_fn, cfg, stable=True),
    ),
    "lookaround+ssam": Method(
        "Lookaround whose members descend with Stable SAM gradients",
        lambda inner, cfg: optax_wa.lookaround(inner, sync_period=5),
        grad_oracle=lambda loss_fn, cfg: _sam_grad(loss_fn, cfg, stable=True),
        same_init=True,
    ),
}


def _sam_grad(loss_fn, cfg: Config, stable: bool):
    """One member's SAM / Stable SAM descent gradient on its own batch."""
    oracle = optax_wa.sam_value_and_grad(loss_fn, rho=cfg.rho, stable=stable)
    return lambda params, x, y: oracle(params, x, y)[1]


def inner_optimizer(cfg: Config) -> optax.GradientTransformation:
    schedule = optax.cosine_decay_schedule(cfg.learning_rate, cfg.steps)
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay),
        optax.sgd(schedule, momentum=cfg.momentum),
    )


def train(name: str, cfg: Config, data: dict, progress: bool = True) -> dict:
    """Trains one method; returns its final metrics, curve and step time."""
    method = METHODS[name]
    init_fn, apply_fn = setup.make_model(cfg.channels)
    params = members.init_members(
        init_fn, jax.random.key(cfg.seed), cfg.members, same_init=method.same_init
    )
    opt = method.optimizer(inner_optimizer(cfg), cfg)
    state = opt.init(params)

    def loss_fn(p, x, y):
        return setup.cross_entropy(apply_fn(p, x), y)

    if method.grad_oracle is None:
        member_grad = jax.grad(loss_fn)
    else:
        member_grad = method.grad_oracle(loss_fn, cfg)

    x_train, y_train = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
    x_test, y_test = jnp.asarray(data["x_test"]), jnp.asarray(data["y_test"])
    kinds = jnp.arange(cfg.members) % setup.NUM_AUGMENTATIONS

    @jax.jit
    def step(params, state, idx, key):
        x = jax.vmap(setup.augment)(
            x_train[idx], jax.random.split(key, cfg.members), kinds
        )
        grads = jax.vmap(member_grad)(params, x, y_train[idx])
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    @jax.jit
    def evaluate(params):
        logits = jax.vmap(apply_fn, in_axes=(0, None))(params, x_test)
        member_acc = jax.vmap(setup.accuracy, in_axes=(0, None))(logits, y_test)
        averaged = apply_fn(members.average_members(params), x_test)
        return {
            "member_acc": member_acc.mean(),
            "ensemble_acc": setup.accuracy(logits.mean(0), y_test),
            "averaged_acc": setup.accuracy(averaged, y_test),
        }

    # Each member has its own data order.
    rng = np.random.default_rng(cfg.seed)
    n = len(data["x_train"])
    per_epoch = n // cfg.batch_size
    epochs = -(-cfg.steps // per_epoch)
    order = np.stack(
        [
            np.concatenate([rng.permutation(n) for _ in range(epochs)])[
                : cfg.steps * cfg.batch_size
            ].reshape(cfg.steps, cfg.batch_size)
            for _ in range(cfg.members)
        ],
        axis=1,
    )  # (steps, members, batch)
    keys = jax.random.split(jax.random.key(cfg.seed + 1), cfg.steps)

    curve, times = [], []
    iterator = range(cfg.steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(iterator, desc=f"{name:>11}", leave=True, dynamic_ncols=True)
        iterator = bar
    for t in iterator:
        start = time.perf_counter()
        params, state = step(params, state, order[t], keys[t])
        jax.block_until_ready(params)
        times.append(time.perf_counter() - start)
        if (t + 1) % cfg.eval_every == 0 or t + 1 == cfg.steps:
            metrics = {k: float(v) for k, v in evaluate(params).items()}
            curve.append({"step": t + 1, **metrics})
            if bar is not None:
                bar.set_postfix(
                    avg=f"{metrics['averaged_acc']:.3f}",
                    ens=f"{metrics['ensemble_acc']:.3f}",
                )
    step_time = float(np.median(times[5:] if len(times) > 10 else times))
    return {
        **curve[-1],
        "step_time_ms": 1e3 * step_time,
        "curve": curve,
        "description": method.description,
    }


def print_table(results: dict) -> None:
    base = results.get("sgd", next(iter(results.values())))["step_time_ms"]
    header = "| method | member acc | ensemble acc | averaged acc | step time vs sgd |"
    print(header)
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['member_acc']:.3f} | {r['ensemble_acc']:.3f} | "
            f"{r['averaged_acc']:.3f} | {r['step_time_ms'] / base:.2f} |"
        )


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, r) in enumerate(results.items()):
        steps = [c["step"] for c in r["curve"]]
        color = f"C{i}"
        ax.plot(
            steps,
            [c["averaged_acc"] for c in r["curve"]],
            color=color,
            label=f"{name}: averaged model",
        )
        ax.plot(
            steps,
            [c["member_acc"] for c in r["curve"]],
            color=color,
            ls="--",
            label=f"{name}: mean member",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy")
    ax.set_title("MNIST-1D, stacked ensemble")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=list(METHODS)
    )
    parser.add_argument("--out", default="results/compare")
    parser.add_argument("--no-progress", action="store_true")
    for field in dataclasses.fields(Config):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=type(field.default),
            default=field.default,
        )
    args = parser.parse_args(argv)
    cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    data = setup.load_mnist1d()
    print(
        f"MNIST-1D: {len(data['x_train'])} train / {len(data['x_test'])} test; "
        f"{cfg.members} members, {cfg.steps} steps; devices: {jax.devices()[0].platform}"
    )
    results = {}
    for name in args.methods:
        results[name] = train(name, cfg, data, progress=not args.no_progress)
    print()
    print_table(results)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "results": results}, f, indent=1)
    plot(results, os.path.join(args.out, "accuracy.png"))
    print(f"\nwrote {args.out}/results.json and {args.out}/accuracy.png")
    return results


if __name__ == "__main__":
    main()
