"""SlimCLR example entry point.

    python -m examples.slimclr.main --workdir=/tmp/slimclr_mnist1d \
        --config=examples/slimclr/configs/mnist1d.py --logtostderr [--config.framework=mocov2]

    python -m examples.slimclr.main --workdir=/tmp/slimclr_cifar \
        --config=examples/slimclr/configs/default.py --logtostderr
"""

from examples.common.main import run

if __name__ == "__main__":
    from examples.slimclr import train

    run(train.train_and_evaluate)
