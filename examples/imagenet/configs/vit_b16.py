"""ImageNet-1k, ViT-B/16 (otherwise as ``default.py``)."""

from examples.imagenet.configs import default


def get_config():
    config = default.get_config()
    config.model.name = "vit_b16"
    return config
