"""Models shared by the trainers: a Vision Transformer in Flax NNX and a registry.

Example code, not library API.

Pre-norm encoder blocks (LayerNorm, multi-head self-attention, LayerNorm,
GELU MLP), learned position embeddings, global average pooling or a class
token, a zero-initialized head. Computation runs in ``dtype`` (e.g.
``bfloat16``) with float32 parameters; the model holds no random state (no
dropout), so a forward pass is a pure function of params and inputs.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx


class SelfAttention(nnx.Module):
    """Multi-head self-attention with a fused QKV projection."""

    def __init__(self, dim: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(
                f"dim ({dim}) must be a multiple of num_heads ({num_heads})."
            )
        self.num_heads = num_heads
        self.qkv = nnx.Linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(
            q.dtype
        )
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return self.out(attended.reshape(batch, tokens, dim))


class EncoderBlock(nnx.Module):
    """``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(
        self, dim: int, num_heads: int, mlp_dim: int, *, dtype, rngs: nnx.Rngs
    ):
        self.norm1 = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.attention = SelfAttention(dim, num_heads, dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.mlp_in = nnx.Linear(dim, mlp_dim, dtype=dtype, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm2(x))))


class ViT(nnx.Module):
    """Vision Transformer: patchify, encoder, pool, linear head.

    Args:
      num_classes: size of the output layer.
      image_size: input height and width (square), a multiple of ``patch_size``.
      patch_size: side of the square patches.
      dim: token width.
      depth: number of encoder blocks.
      num_heads: attention heads per block.
      mlp_dim: hidden width of the MLPs.
      pool: ``"gap"`` (mean over tokens) or ``"cls"`` (a class token).
      dtype: computation dtype (params stay float32).
      rngs: ``nnx.Rngs`` for initialization.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        image_size: int,
        patch_size: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        pool: str = "gap",
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if image_size % patch_size:
            raise ValueError(
                f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})."
            )
        if pool not in ("gap", "cls"):
            raise ValueError(f"pool must be 'gap' or 'cls', got {pool!r}.")
        self.pool = pool
        num_tokens = (image_size // patch_size) ** 2 + (pool == "cls")
        self.patch_embed = nnx.Conv(
            3,
            dim,
            (patch_size, patch_size),
            strides=(patch_size, patch_size),
            padding="VALID",
            dtype=dtype,
            rngs=rngs,
        )
        init = nnx.initializers.normal(0.02)
        self.pos_embed = nnx.Param(init(rngs.params(), (1, num_tokens, dim)))
        self.cls_token = nnx.Param(jnp.zeros((1, 1, dim))) if pool == "cls" else None
        self.blocks = nnx.List(
            [
                EncoderBlock(dim, num_heads, mlp_dim, dtype=dtype, rngs=rngs)
                for _ in range(depth)
            ]
        )
        self.norm = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(
            dim, num_classes, kernel_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs
        )
        self.dtype = dtype

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no dropout and no batch statistics
        x = self.patch_embed(x.astype(self.dtype))
        batch = x.shape[0]
        x = x.reshape(batch, -1, x.shape[-1])
        if self.cls_token is not None:
            cls = jnp.broadcast_to(self.cls_token[...], (batch, 1, x.shape[-1]))
            x = jnp.concatenate([cls.astype(x.dtype), x], axis=1)
        x = x + self.pos_embed[...].astype(x.dtype)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        x = x[:, 0] if self.pool == "cls" else x.mean(axis=1)
        return self.head(x).astype(jnp.float32)


def create_model(architectures: Mapping, config, rngs: nnx.Rngs, **fixed) -> nnx.Module:
    """Builds ``architectures[config.model.name]`` with ``config.model.kwargs`` overrides.

    ``architectures`` maps a name to ``(class, default keyword arguments)``;
    ``fixed`` are keywords the trainer sets (e.g. the image size).
    """
    name = config.model.name
    if name not in architectures:
        raise ValueError(
            f"config.model.name must be one of {sorted(architectures)}, got {name!r}."
        )
    cls, kwargs = architectures[name]
    kwargs = {**kwargs, **fixed, **dict(config.model.get("kwargs", {}))}
    return cls(config.num_classes, dtype=jnp.dtype(config.dtype), rngs=rngs, **kwargs)
