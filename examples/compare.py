"""The main job: every method of the library side by side on MNIST-1D.

Trains an ensemble of ``--members`` small 1-D CNNs with each method, every
member on its own data order and its own augmentation (three policies,
assigned round-robin), and reports

* the mean test accuracy of the members,
* the accuracy of the logit ensemble (mean of the members' logits),
* the accuracy of the averaged model (uniform average of the weights),
* the step time relative to independent SGD members, measured after training
  in interleaved rounds (every method in turn, ``--timing-rounds`` times) and
  reported as the median of the per-round ratios.

Writes ``results.json`` and ``accuracy.png`` (one panel per evaluated model --
mean member, logit ensemble, averaged weights -- over training, and a bar
chart of the final accuracies) to ``--out``. Runs on MNIST-1D generated locally (no download)::

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

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # mnist1d_setup; examples.trainer

import mnist1d_setup as setup  # noqa: E402

from examples.trainer import methods  # noqa: E402
from optax_wa import members  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of one comparison; every field is a command-line flag."""

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
    timing_rounds: int = 7
    timing_steps: int = 20
    member_map: str = "auto"


HELP = {
    "members": "ensemble members per method",
    "steps": "training steps per method",
    "batch_size": "examples per member and step",
    "learning_rate": "peak SGD learning rate (cosine decay to 0)",
    "momentum": "SGD momentum",
    "weight_decay": "weight decay: wd * params added to the gradient before SGD",
    "channels": "convolution channels of the 1-D CNN",
    "eval_every": "evaluate on the test set every this many steps",
    "seed": "seed of the initialization, data orders and augmentation",
    "rho": "SAM / Stable SAM perturbation radius",
    "shuffle_prob": "WASH base shuffle probability",
    "timing_rounds": "interleaved timing rounds after training (median reported)",
    "timing_steps": "steps timed per method in each timing round",
    "member_map": "how members' gradients are mapped: vmap, sequential or auto "
    "(members.map_members; auto is sequential on CPU, vmap elsewhere)",
}

LEGEND = """\
member acc     mean test accuracy of the members, each evaluated alone
ensemble acc   test accuracy of the logit ensemble (mean of the members' logits)
averaged acc   test accuracy of one model whose weights are the members' mean
step time      time of one training step (all members) relative to sgd: median
               over {rounds} interleaved rounds of {steps} steps per method, run
               after training; a ratio, so machine speed cancels out"""


@dataclasses.dataclass(frozen=True)
class Method:
    """One compared method: a name of the method registry and its settings.

    The optimizer around the per-member SGD and the gradient oracle are built
    by :mod:`examples.trainer.methods` from the name (``"lookaround+ssam"``:
    averaging ``lookaround``, sharpness ``ssam``), with ``averaging`` as the
    averaging method's options (``cfg -> dict``); members start from one point
    where the registry says so (Lookaround, WASH), else each from its own key.
    """

    description: str
    averaging: Callable[[Config], dict] = lambda cfg: {}


LOOKAROUND = lambda cfg: {"sync_period": 5}

METHODS: dict[str, Method] = {
    "sgd": Method("independent members (SGD momentum)"),
    "lookaround": Method("Lookaround, sync every 5 steps", LOOKAROUND),
    "papa": Method(
        "PAPA, alpha 0.99 every 10 steps", lambda cfg: {"alpha": 0.99, "period": 10}
    ),
    "wash": Method(
        "WASH, p 0.01 linear in depth, optimizer state shuffled too",
        lambda cfg: {
            "shuffle_prob": cfg.shuffle_prob,
            "layer_probs": "linear",
            "depth_order": ["conv1", "conv2", "conv3", "head"],
            "shuffle_opt_state": True,
            "seed": cfg.seed,
        },
    ),
    "sam": Method("independent members, SAM gradients (rho 0.05)"),
    "ssam": Method("independent members, Stable SAM gradients (rho 0.05)"),
    "lookaround+ssam": Method(
        "Lookaround whose members descend with Stable SAM gradients", LOOKAROUND
    ),
}


def inner_optimizer(cfg: Config) -> optax.GradientTransformation:
    schedule = optax.cosine_decay_schedule(cfg.learning_rate, cfg.steps)
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay),
        optax.sgd(schedule, momentum=cfg.momentum),
    )


def train(name: str, cfg: Config, data: dict, progress: bool = True) -> dict:
    """Trains one method; returns its final metrics, curve and step time."""
    method, parsed = METHODS[name], methods.parse_method(name)
    init_fn, apply_fn = setup.make_model(cfg.channels)
    params = members.init_members(
        init_fn,
        jax.random.key(cfg.seed),
        cfg.members,
        same_init=methods.default_same_init(parsed),
    )
    opt = methods.ensemble_optimizer(
        parsed.averaging, inner_optimizer(cfg), **method.averaging(cfg)
    )
    state = opt.init(params)

    def loss_fn(p, x, y):
        return setup.cross_entropy(apply_fn(p, x), y)

    rho = {} if parsed.sharpness == "none" else {"rho": cfg.rho}
    oracle = methods.grad_oracle(parsed.sharpness, loss_fn, **rho)
    member_grad = lambda params, x, y: oracle(params, x, y)[1]

    x_train, y_train = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
    x_test, y_test = jnp.asarray(data["x_test"]), jnp.asarray(data["y_test"])
    kinds = jnp.arange(cfg.members) % setup.NUM_AUGMENTATIONS

    @jax.jit
    def step(params, state, idx, key):
        x = jax.vmap(setup.augment)(
            x_train[idx], jax.random.split(key, cfg.members), kinds
        )
        grads = members.map_members(member_grad, mode=cfg.member_map)(
            params, x, y_train[idx]
        )
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

    curve = []
    iterator = range(cfg.steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(iterator, desc=f"{name:>11}", leave=True, dynamic_ncols=True)
        iterator = bar
    for t in iterator:
        params, state = step(params, state, order[t], keys[t])
        if (t + 1) % cfg.eval_every == 0 or t + 1 == cfg.steps:
            metrics = {k: float(v) for k, v in evaluate(params).items()}
            curve.append({"step": t + 1, **metrics})
            if bar is not None:
                bar.set_postfix(
                    avg=f"{metrics['averaged_acc']:.3f}",
                    ens=f"{metrics['ensemble_acc']:.3f}",
                )

    def time_steps(num_steps: int) -> float:
        """Seconds per step over ``num_steps`` steps from the final state."""
        p, s = params, state
        start = time.perf_counter()
        for t in range(num_steps):
            p, s = step(p, s, order[t % cfg.steps], keys[t % cfg.steps])
        jax.block_until_ready(p)
        return (time.perf_counter() - start) / num_steps

    return {
        **curve[-1],
        "curve": curve,
        "description": method.description,
        "time_steps": time_steps,
    }


def time_interleaved(results: dict, cfg: Config, baseline: str) -> None:
    """Adds ``step_time_ms`` and ``step_time_ratio`` (vs ``baseline``) to results.

    Every round times each method in turn, so a change of machine load hits
    all methods of a round alike; the ratio is formed within a round and its
    median over rounds is reported.
    """
    names = list(results)
    rows = {name: [] for name in names}
    for name in names:  # warm-up: first calls after training
        results[name]["time_steps"](2)
    for _ in range(cfg.timing_rounds):
        for name in names:
            rows[name].append(results[name]["time_steps"](cfg.timing_steps))
    base = np.asarray(rows[baseline])
    for name in names:
        own = np.asarray(rows[name])
        results[name]["step_time_ms"] = 1e3 * float(np.median(own))
        results[name]["step_time_ratio"] = float(np.median(own / base))
        del results[name]["time_steps"]


def print_table(results: dict, cfg: Config, baseline: str) -> None:
    print(
        f"| method | member acc | ensemble acc | averaged acc | step time vs {baseline} |"
    )
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['member_acc']:.3f} | {r['ensemble_acc']:.3f} | "
            f"{r['averaged_acc']:.3f} | {r['step_time_ratio']:.2f} |"
        )
    print()
    print(
        LEGEND.replace("sgd", baseline).format(
            rounds=cfg.timing_rounds, steps=cfg.timing_steps
        )
    )


def _note_ties(ax, finals: dict) -> None:
    """Names the methods whose final values coincide (their lines overlap)."""
    groups: dict[str, list[str]] = {}
    for name, value in finals.items():
        groups.setdefault(f"{value:.3f}", []).append(name)
    ties = [f"{', '.join(n)} end at {v}" for v, n in groups.items() if len(n) > 1]
    if ties:
        ax.text(
            0.5,
            1.01,
            "lines overlap: " + "; ".join(ties),
            transform=ax.transAxes,
            fontsize=7,
            ha="center",
            va="bottom",
        )


QUANTITIES = (
    ("member_acc", "mean member"),
    ("ensemble_acc", "logit ensemble"),
    ("averaged_acc", "averaged weights"),
)
MARKERS = "osD^v<>ph*"


def plot(results: dict, path: str) -> None:
    """One panel per evaluated model over training, and a bar chart of finals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    names = list(results)
    for ax, (key, title) in zip(axes.flat[:3], QUANTITIES):
        for i, name in enumerate(names):
            curve = results[name]["curve"]
            ax.plot(
                [c["step"] for c in curve],
                [c[key] for c in curve],
                color=f"C{i}",
                marker=MARKERS[i % len(MARKERS)],
                markersize=4,
                lw=1.3,
                label=name,
            )
        if key != "averaged_acc":
            # Zoom on the last three quarters of training, where the methods
            # differ by a few points; the averaged model keeps the full range
            # (a weight average of unrelated members sits near chance).
            late = [
                c[key]
                for name in names
                for c in results[name]["curve"]
                if c["step"] >= results[name]["curve"][-1]["step"] / 4
            ]
            ax.set_ylim(min(late) - 0.01, max(late) + 0.005)
        _note_ties(ax, {name: results[name][key] for name in names})
        ax.set_title(f"{title}: test accuracy", pad=14)
        ax.set_xlabel("step")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="lower right")

    ax = axes[1, 1]
    width = 0.8 / len(QUANTITIES)
    x = np.arange(len(names))
    for j, (key, title) in enumerate(QUANTITIES):
        values = [results[name][key] for name in names]
        bars = ax.bar(x + (j - 1) * width, values, width, label=title, color=f"C{j}")
        ax.bar_label(bars, fmt="%.3f", fontsize=6, rotation=90, padding=2)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1.4)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("final test accuracy")
    ax.set_title("final accuracies")
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle("MNIST-1D, stacked ensembles: one panel per evaluated model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=list(METHODS),
        metavar="METHOD",
        help="methods to train, in this order; choices: "
        + "; ".join(f"{k} = {m.description}" for k, m in METHODS.items()),
    )
    parser.add_argument(
        "--out", default="results/compare", help="folder for results.json and the PNG"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    for field in dataclasses.fields(Config):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=type(field.default),
            default=field.default,
            help=HELP[field.name],
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
    baseline = "sgd" if "sgd" in results else args.methods[0]
    time_interleaved(results, cfg, baseline)
    print()
    print_table(results, cfg, baseline)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "results": results}, f, indent=1)
    plot(results, os.path.join(args.out, "accuracy.png"))
    print(f"\nwrote {args.out}/results.json and {args.out}/accuracy.png")
    return results


if __name__ == "__main__":
    main()
