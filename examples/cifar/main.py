"""CIFAR trainer entry point.

    python -m examples.cifar.main --workdir=/tmp/cifar \
        --config=examples/cifar/configs/default.py --config.method=lookaround+ssam
"""

from examples.trainer.cli import run

if __name__ == "__main__":
    from examples.cifar import train

    run(train.train_and_evaluate)
