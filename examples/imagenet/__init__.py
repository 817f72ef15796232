"""ImageNet (imagenet2012) ViT trainer for the optax_wa methods."""
