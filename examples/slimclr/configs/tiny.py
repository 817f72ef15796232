"""A tiny local config: a slimmable ResNet of one block, two widths, 2 epochs (smoke runs).

Offline on mock CIFAR-10 records (seconds on a CPU)::

    python -m examples.slimclr.main --workdir=/tmp/slimclr_mock \
        --config=examples/slimclr/configs/tiny.py --config.mock_data=True
"""

from examples.slimclr.configs import default


def get_config():
    config = default.get_config()
    config.stage_sizes = (1,)
    config.num_filters = 8
    config.widths = (1.0, 0.5)
    config.projection_dim = 8
    config.batch_size = 8
    config.num_epochs = 2
    config.warmup_epochs = 1
    config.slow_start_fraction = 0.5
    config.queue_size = 16
    config.probe_epochs = 1
    config.probe_batch_size = 8
    config.save_checkpoint = False
    return config
