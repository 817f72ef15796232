"""CIFAR-10/100 trainer for the optax_wa methods (ResNet, WideResNet, ViT)."""
