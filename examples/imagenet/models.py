"""ImageNet Vision Transformers: ViT-S/16 and ViT-B/16 (Flax NNX).

The architecture is :class:`examples.trainer.models.ViT` (global average
pooling, zero-initialized head, no dropout); the image size comes from
``config.image_size``.
"""

from __future__ import annotations

import ml_collections
from flax import nnx

from examples.trainer import models as trainer_models
from examples.trainer.models import ViT

ARCHITECTURES = {
    "vit_s16": (ViT, dict(patch_size=16, dim=384, depth=12, num_heads=6, mlp_dim=1536)),
    "vit_b16": (
        ViT,
        dict(patch_size=16, dim=768, depth=12, num_heads=12, mlp_dim=3072),
    ),
}


def create_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
    return trainer_models.create_model(
        ARCHITECTURES, config, rngs, image_size=config.image_size
    )
