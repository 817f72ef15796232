"""Machinery shared by the CIFAR and ImageNet trainers (written once)."""
