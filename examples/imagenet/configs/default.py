"""ImageNet-1k, ViT-S/16, AdamW, bfloat16 computation, warmup + cosine, mixup.

Switch the model with ``--config.model.name=vit_b16`` (or
``configs/vit_b16.py``) and the method with e.g.
``--config.method=adamw+lookaround --config.num_members=3``.
"""

import ml_collections
from ml_collections import config_dict

from examples.cifar.configs import default as cifar_default


def get_config() -> ml_collections.ConfigDict:
    # The method, optimizer and schedule fields are those of the CIFAR config.
    config = cifar_default.get_config()
    config.dataset = "imagenet2012"
    config.num_classes = 1000
    config.data_dir = config_dict.placeholder(str)
    config.train_split = "train"
    config.eval_split = "validation"
    config.image_size = 224
    config.image_mean = (0.485, 0.456, 0.406)
    config.image_std = (0.229, 0.224, 0.225)
    config.worker_count = 16
    config.member_augment = ("randaugment",)

    config.model.name = "vit_s16"  # vit_s16 | vit_b16
    config.dtype = "bfloat16"

    config.method = "adamw"
    config.num_members = 1
    config.member_map = "auto"  # members.map_members mode: vmap | sequential | auto

    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 10_000
    config.optimizer.schedule = "cosine"
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    # optax.adamw multiplies the decay by the learning rate: 0.1 * 1e-3 = 1e-4.
    config.optimizer.weight_decay = 0.1
    config.optimizer.grad_clip_norm = 1.0

    config.label_smoothing = 0.0
    config.mixup_alpha = 0.2

    config.batch_size = 1024
    config.eval_batch_size = 1024
    config.num_epochs = 90
    config.recalibration_batches = 0  # the ViT has no BatchNorm

    config.log_every_steps = 100
    config.eval_every_steps = 5000
    config.checkpoint_every_steps = 2500
    return config
