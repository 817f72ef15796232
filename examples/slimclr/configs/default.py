"""SlimCLR on CIFAR-10: a slimmable CIFAR ResNet-18, SimCLR, widths [1, .75, .5, .25].

    python -m examples.slimclr.main --workdir=/tmp/slimclr_cifar \
        --config=examples/slimclr/configs/default.py

Prepare CIFAR-10 first (array_record files for ``tfds.data_source``)::

    python -c "import tensorflow_datasets as tfds; tfds.data_source('cifar10', download=True)"
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Data.
    config.dataset = "cifar10"
    config.data_dir = None
    # True: random CIFAR records (tfds.testing.mock_data), offline; checks
    # that a config runs. No effect on the embedded MNIST-1D.
    config.mock_data = False
    config.data_seed = 42  # MNIST-1D generator seed
    config.train_split = "train"
    config.eval_split = "test"
    config.max_train_examples = None
    config.max_eval_examples = None

    # Model: "resnet" (CIFAR stem) or "cnn1d".
    config.model = "resnet"
    config.stage_sizes = (2, 2, 2, 2)  # ResNet-18
    config.num_filters = 64
    config.channels = (32, 64, 128)  # cnn1d
    config.kernel_size = 5
    config.projection_dim = 128
    config.widths = (1.0, 0.75, 0.5, 0.25)

    # Contrastive framework: "simclr", "mocov2" or "mocov3", each with its
    # released head (SimCLR's ends with a switchable BN; MoCo v3 adds a
    # slimmable predictor). MoCo v3 as released: temperature 1.0,
    # distill_temperature 1.0, mlp_dim 4096, optimizer "lars".
    config.framework = "simclr"
    config.temperature = 0.2  # NT-Xent / InfoNCE / MoCo v3 temperature
    config.queue_size = 4096  # MoCo v2
    config.key_momentum = 0.99  # MoCo v2 EMA; MoCo v3's base (cosine to 1)
    config.mlp_dim = None  # hidden size of the heads (None: representation size)

    # SlimCLR: slow start, online distillation, loss reweighting.
    config.slow_start_fraction = 0.5  # fraction of training with the full width only
    config.distill_weight = 0.5
    config.distill_temperature = 5.0
    config.loss_weight_mode = 5

    # Augmentation.
    config.augment = ml_collections.ConfigDict()
    config.augment.min_crop = 0.2
    config.augment.color_jitter = 0.4
    config.augment.amplitude = 0.2  # signals
    config.augment.trend = 0.5  # signals
    config.augment.noise = 0.1  # signals

    # Optimization (pretraining): "sgd" (momentum), "adamw" or "lars".
    config.optimizer = "sgd"
    config.learning_rate = 0.5  # for batch_size 256, scaled linearly
    # The released reset of the base rate at the slow-start switch (scaled as
    # learning_rate); None keeps one cosine.
    config.slim_start_lr = None
    config.momentum = 0.9
    config.trust_coefficient = 1e-3  # LARS
    config.weight_decay = 1e-4
    config.warmup_epochs = 5
    config.batch_size = 256
    config.num_epochs = 200

    # Switchable linear probe on the frozen backbone: "adam" (standardized
    # features) or "released" (SGD on raw features, sub-widths distilled
    # from the full-width head; the released recipe uses lr 0.4, 90 epochs).
    config.probe = "adam"
    config.probe_momentum = 0.9  # "released"
    config.probe_epochs = 50
    config.probe_batch_size = 256
    config.probe_learning_rate = 1e-2

    config.log_every_epochs = 1
    config.tensorboard = True  # per-epoch scalars in workdir/tensorboard
    config.save_checkpoint = True
    return config
