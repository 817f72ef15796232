"""SlimCLR vs naive slimmable training vs individually trained networks (MNIST-1D).

For each of ``--seeds`` paired seeds (the same seed gives every method the
same initialization of the shared weights, data order and augmentations):

* **individual**: one contrastive (SimCLR) network per width, trained alone
  with the width's channel counts;
* **naive**: one slimmable network, all widths trained jointly from the start
  with equal loss weights, no distillation;
* **slimclr**: slow start (full width only for the first half), online
  distillation (a = 0.5, T = 5) and loss reweighting (mode 5).

Every network is then evaluated by a linear probe on its frozen features
(one head per width), against a linear probe on the raw signals. The script
prints the accuracy per width and method (mean and standard deviation over
seeds), the paired difference SlimCLR - naive per width (mean and 95%
t-interval), each method's margin over the raw-input probe, and the
gradient-imbalance ratio over training.

    python benchmarks/slimclr_mnist1d.py            # 5 seeds, about 10 min on 2 cores
    python benchmarks/slimclr_mnist1d.py --seeds 1 --epochs 4   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from examples.slimclr import input_pipeline, train  # noqa: E402
from examples.slimclr.configs import mnist1d  # noqa: E402
from optax_wa.slimmable import slim_size  # noqa: E402

WIDTHS = (1.0, 0.5, 0.25)
METHODS = ("individual", "naive", "slimclr")


def method_config(method: str, seed: int, args, width: float | None = None):
    config = mnist1d.get_config()
    config.seed = seed
    config.num_epochs = args.epochs
    config.probe_epochs = args.probe_epochs
    config.channels = tuple(args.channels)
    config.widths = WIDTHS
    if method == "individual":
        config.channels = tuple(slim_size(c, width) for c in args.channels)
        config.widths = (1.0,)
        config.slow_start_fraction = 0.0
    elif method == "naive":
        config.slow_start_fraction = 0.0
        config.loss_weight_mode = 0
        config.distill_weight = 0.0
    elif method == "slimclr":
        config.slow_start_fraction = 0.5
        config.loss_weight_mode = 5
        config.distill_weight = 0.5
    else:
        raise ValueError(method)
    return config


def run_one(method, seed, data, args):
    """Probe accuracy per width and the imbalance ratio per epoch for one seed."""
    if method == "individual":
        accuracy, ratios = {}, None
        for w in WIDTHS:
            config = method_config(method, seed, args, w)
            graphdef, params, stats, _ = train.pretrain(config, data, log=False)
            acc, _ = train.probe_backbone(graphdef, params, stats, data, config)
            accuracy[w] = acc[1.0]
        return accuracy, ratios
    config = method_config(method, seed, args)
    graphdef, params, stats, history = train.pretrain(config, data, log=False)
    accuracy, _ = train.probe_backbone(graphdef, params, stats, data, config)
    return accuracy, [e["imbalance_ratio"] for e in history]


def paired_interval(diffs):
    from scipy import stats

    diffs = np.asarray(diffs, np.float64)
    mean = diffs.mean()
    if len(diffs) < 2:
        return mean, float("nan")
    half = stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / np.sqrt(len(diffs))
    return mean, half


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--probe-epochs", type=int, default=100)
    parser.add_argument("--channels", type=int, nargs=3, default=(32, 64, 128))
    parser.add_argument(
        "--json", type=str, default=None, help="write the raw results here"
    )
    args = parser.parse_args()

    # Seeds share every compiled program (the seed only changes array values).
    jax.config.update(
        "jax_compilation_cache_dir", tempfile.mkdtemp(prefix="slimclr_jax_")
    )
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    start = time.time()
    base = mnist1d.get_config()
    base.probe_epochs = args.probe_epochs
    data = input_pipeline.load(base)
    print(
        f"MNIST-1D: {len(data.y_train)} train / {len(data.y_test)} test; widths {WIDTHS}; "
        f"channels {tuple(args.channels)}; {args.epochs} epochs (batch {base.batch_size}); "
        f"probe {args.probe_epochs} epochs; {args.seeds} seeds; devices {jax.devices()}",
        flush=True,
    )
    seeds = list(range(args.seeds))
    raw = []
    for seed in seeds:
        config = mnist1d.get_config()
        config.seed, config.probe_epochs = seed, args.probe_epochs
        raw.append(train.raw_input_probe(data, config))
    results = {m: [] for m in METHODS}
    ratios = {m: [] for m in METHODS}
    for method in METHODS:
        t0 = time.time()
        for seed in seeds:
            acc, ratio = run_one(method, seed, data, args)
            results[method].append(acc)
            ratios[method].append(ratio)
            print(
                f"  {method:10s} seed {seed}: "
                + ", ".join(f"w={w}: {100 * acc[w]:.1f}" for w in WIDTHS),
                flush=True,
            )
        print(f"{method}: {time.time() - t0:.0f}s", flush=True)

    raw_mean = 100 * np.mean(raw)
    print(f"\nLinear probe on raw inputs: {raw_mean:.1f} +- {100 * np.std(raw):.1f} %")
    print("\nLinear-probe test accuracy (%), mean +- std over seeds")
    print(
        f"{'width':>6} | "
        + " | ".join(f"{m:>13}" for m in METHODS)
        + " | slimclr - naive (paired, 95% CI)"
    )
    for w in WIDTHS:
        cells = []
        for m in METHODS:
            a = 100 * np.array([r[w] for r in results[m]])
            cells.append(f"{a.mean():6.1f} +- {a.std():4.1f}")
        diffs = [
            100 * (s[w] - n[w]) for s, n in zip(results["slimclr"], results["naive"])
        ]
        mean, half = paired_interval(diffs)
        print(
            f"{w:>6} | "
            + " | ".join(f"{c:>13}" for c in cells)
            + f" | {mean:+.1f} +- {half:.1f}"
        )

    print("\nMargin over the raw-input probe (points; target >= 20 for every width)")
    ok = True
    for m in METHODS:
        margins = []
        for w in WIDTHS:
            paired = [100 * (r[w] - raw_acc) for r, raw_acc in zip(results[m], raw)]
            margins.append(f"w={w}: {np.mean(paired):+.1f} (min {np.min(paired):+.1f})")
            ok &= bool(np.min(paired) >= 20)
        print(f"  {m:10s} " + ", ".join(margins))
    print(f"  every width of every method and seed >= 20 points: {ok}")

    print(
        "\nGradient-imbalance ratio ||g_full \\ min|| / ||g_min|| (mean over layers and "
        "seeds; < 1: the min-width block dominates)"
    )
    for m in ("naive", "slimclr"):
        per_epoch = np.mean(np.array(ratios[m]), axis=0)
        marks = sorted(
            {
                0,
                len(per_epoch) // 4,
                len(per_epoch) // 2 - 1,
                len(per_epoch) // 2,
                3 * len(per_epoch) // 4,
                len(per_epoch) - 1,
            }
        )
        print(
            f"  {m:8s} "
            + ", ".join(f"epoch {e + 1}: {per_epoch[e]:.2f}" for e in marks)
        )
    print(f"\ntotal {time.time() - start:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "raw": raw,
                    "results": {
                        m: [{str(w): a for w, a in r.items()} for r in rs]
                        for m, rs in results.items()
                    },
                    "imbalance_ratio": {m: ratios[m] for m in ("naive", "slimclr")},
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
