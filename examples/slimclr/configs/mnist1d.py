"""A tiny local config: SlimCLR on MNIST-1D (embedded, no download), 1-D CNN.

Runs in a few minutes on a CPU::

    python -m examples.slimclr.main --workdir=/tmp/slimclr_mnist1d \
        --config=examples/slimclr/configs/mnist1d.py

Add ``--config.framework=mocov2`` for the MoCo v2 variant, or
``--config.framework=mocov3 --config.temperature=1.0
--config.distill_temperature=1.0`` for MoCo v3 with its released
temperatures (``--config.optimizer=lars`` and ``--config.slim_start_lr`` for
the released optimizer and learning-rate reset).
"""

from examples.slimclr.configs import default


def get_config():
    config = default.get_config()
    config.dataset = "mnist1d"
    config.model = "cnn1d"
    config.channels = (32, 64, 128)
    config.widths = (1.0, 0.5, 0.25)
    config.projection_dim = 64
    config.temperature = 0.2
    config.queue_size = 1024
    config.augment.min_crop = 0.6
    config.optimizer = "adamw"
    config.learning_rate = 2e-3
    config.weight_decay = 1e-4
    config.warmup_epochs = 2
    config.batch_size = 256
    config.num_epochs = 30
    config.probe_epochs = 100
    config.probe_batch_size = 500
    config.probe_learning_rate = 1e-2
    config.save_checkpoint = False
    return config
