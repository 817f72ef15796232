"""A tiny local config (the tests' and a smoke run's): small model, batch and run.

Used with ``tfds.testing.mock_data`` in tests, or on digits::

    python -m examples.cifar.main --workdir=/tmp/tiny \
        --config=examples/cifar/configs/tiny.py --config.dataset=digits
"""

from examples.cifar.configs import default


def get_config():
    config = default.get_config()
    config.worker_count = 0
    config.model.kwargs.stage_sizes = (1,)  # one basic block of 4 channels
    config.model.kwargs.widths = (4,)
    config.num_members = 2
    config.batch_size = 8
    config.eval_batch_size = 8
    config.num_train_steps = 2
    config.recalibration_batches = 1
    config.log_every_steps = 1
    config.eval_every_steps = 2
    config.checkpoint_every_steps = 2
    config.progress_bar = False
    config.lookaround.sync_period = 2
    # PAPA pulls after the 1st, (k+1)-th… update of every epoch: with k = 1
    # the two steps both pull (step 2 is a sync, as for Lookaround's k = 2).
    config.papa.period = 1
    config.lookahead.sync_period = 2
    config.wash.shuffle_prob = 0.5
    return config
