"""ImageNet trainer entry point.

    python -m examples.imagenet.main --workdir=/tmp/imagenet \
        --config=examples/imagenet/configs/default.py
"""

from examples.trainer.cli import run

if __name__ == "__main__":
    from examples.imagenet import train

    run(train.train_and_evaluate)
