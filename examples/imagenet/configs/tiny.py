"""A tiny local config: a 2-block ViT of width 16 on 32x32 crops (tests, smoke runs)."""

from examples.imagenet.configs import default


def get_config():
    config = default.get_config()
    config.image_size = 32
    config.model.kwargs.patch_size = 8
    config.model.kwargs.dim = 16
    config.model.kwargs.depth = 1
    config.model.kwargs.num_heads = 2
    config.model.kwargs.mlp_dim = 32
    config.worker_count = 0
    config.num_members = 2
    config.method = "adamw+lookaround"
    config.batch_size = 8
    config.eval_batch_size = 8
    config.num_train_steps = 1
    config.optimizer.warmup_steps = 0
    config.log_every_steps = 1
    config.eval_every_steps = 1
    config.checkpoint_every_steps = 1
    config.progress_bar = False
    return config
