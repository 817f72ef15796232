"""SlimCLR example entry point.

    python -m examples.slimclr.main --workdir=/tmp/slimclr_mnist1d \
        --config=examples/slimclr/configs/mnist1d.py [--config.framework=mocov2]

    python -m examples.slimclr.main --workdir=/tmp/slimclr_cifar \
        --config=examples/slimclr/configs/default.py

Progress (per-width losses, imbalance ratio, probe accuracies) is logged to
stderr at INFO level (pass ``--verbosity=-1`` for warnings only).
"""

import sys

from examples.trainer.cli import run

if __name__ == "__main__":
    from examples.slimclr import train

    # Defaults placed first, so flags given on the command line override them.
    sys.argv[1:1] = ["--verbosity=0", "--logtostderr"]
    run(train.train_and_evaluate)
