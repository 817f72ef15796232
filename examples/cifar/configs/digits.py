"""Embedded real data: scikit-learn's 8x8 digits upscaled to 32x32x3, no download.

Trains the CIFAR trainer's ResNet (one block per stage) on a laptop CPU in
minutes::

    python -m examples.cifar.main --workdir=/tmp/digits \
        --config=examples/cifar/configs/digits.py
"""

from examples.cifar.configs import default


def get_config():
    config = default.get_config()
    config.dataset = "digits"
    config.num_classes = 10
    config.image_mean = (0.2, 0.2, 0.2)
    config.image_std = (0.35, 0.35, 0.35)
    config.worker_count = 0
    config.random_flip = False  # a mirrored digit is another glyph
    config.model.kwargs.stage_sizes = (1, 1, 1)
    config.model.kwargs.widths = (8, 16, 32)
    config.batch_size = 64
    config.eval_batch_size = 120
    config.num_epochs = 10
    config.optimizer.learning_rate = 0.1
    config.recalibration_batches = 4
    config.log_every_steps = 20
    config.eval_every_steps = 112  # about every 5 epochs (1437 records, 64 per step)
    config.checkpoint_every_steps = 112
    return config
