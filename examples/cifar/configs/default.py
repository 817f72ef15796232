"""CIFAR-10, ResNet-20, Lookaround with 3 members (one augmentation policy each).

Every field can be overridden on the command line, e.g.
``--config.method=lookaround+ssam --config.model.name=wrn16_8
--config.dataset=cifar100 --config.num_classes=100``.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Data.
    config.dataset = "cifar10"  # cifar10 | cifar100 | digits
    config.num_classes = 10
    config.data_dir = config_dict.placeholder(str)
    # True: random records of the dataset's shapes (tfds.testing.mock_data),
    # offline, nothing prepared: checks that a config runs (not "digits").
    config.mock_data = False
    config.train_split = "train"
    config.eval_split = "test"
    config.image_mean = (0.4914, 0.4822, 0.4465)
    config.image_std = (0.2470, 0.2435, 0.2616)
    config.worker_count = 4  # grain worker processes (0: in the main process)
    # Per-member augmentation policies, cycled over members
    # (crop_flip | autoaugment | randaugment; see examples/trainer/augment.py).
    config.member_augment = ("crop_flip", "autoaugment", "randaugment")
    config.random_flip = True  # the horizontal flip of every policy

    # Model.
    config.model = ml_collections.ConfigDict()
    config.model.name = "resnet20"  # resnet20 | resnet18 | wrn16_8 | vit
    config.model.kwargs = ml_collections.ConfigDict()  # overrides of the architecture
    config.dtype = "float32"  # computation dtype; params stay float32

    # Method: '+'-joined tokens (examples/trainer/methods.py), e.g. "sgd",
    # "adamw", "lookahead", "lookaround", "papa", "wash", "sam", "usam",
    # "asam", "ssam", "lookaround+ssam".
    config.method = "lookaround"
    config.num_members = 3
    config.same_init = config_dict.placeholder(bool)  # None: method default
    config.mesh_members = config_dict.placeholder(int)  # None: gcd(M, devices)
    config.member_map = "auto"  # members.map_members mode: vmap | sequential | auto

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 0.1
    config.optimizer.schedule = "cosine"  # cosine | constant
    config.optimizer.warmup_steps = 0
    config.optimizer.end_learning_rate = 0.0
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = False
    config.optimizer.weight_decay = 5e-4  # sgd: coupled (added to the gradient)
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.grad_clip_norm = 0.0  # 0: no clipping

    config.lookahead = ml_collections.ConfigDict(
        dict(sync_period=5, slow_step_size=0.5)
    )
    config.lookaround = ml_collections.ConfigDict(
        dict(sync_period=5, state_policy="keep")
    )
    config.papa = ml_collections.ConfigDict(dict(alpha=0.99, period=10, lr_scaled=True))
    config.wash = ml_collections.ConfigDict(
        dict(shuffle_prob=0.01, layer_probs="linear", shuffle_opt_state=False)
    )
    # rho for sam/usam/ssam; asam uses asam_rho; ssam renormalizes the
    # `perturbation` ascent ("sam" or "usam").
    config.sam = ml_collections.ConfigDict(
        dict(rho=0.05, asam_rho=0.5, adaptive_eta=0.01, perturbation="sam")
    )
    # BatchNorm statistics at Lookaround syncs / PAPA pulls: "average" | "none".
    config.bn_sync = "average"

    config.label_smoothing = 0.0
    config.mixup_alpha = 0.0

    # Schedule of the run. batch_size is per member (global over processes).
    config.batch_size = 128
    config.eval_batch_size = 500
    config.num_epochs = 200
    config.num_train_steps = -1  # > 0 overrides num_epochs
    config.recalibration_batches = 20

    config.log_every_steps = 100
    config.eval_every_steps = 3900
    config.checkpoint_every_steps = 3900
    config.max_checkpoints_to_keep = 2
    config.progress_bar = True
    config.tensorboard = True  # scalars in workdir/tensorboard (tensorboardX)
    config.seed = 0
    return config
