"""ELCRec model: a SASRec encoder plus learnable intent centres.

Spec: ``shared/docs/elcrec-method.md``, section "Encoder (SASRec)". The model knows nothing of
devices, optimizers, loss weights or ranks; losses live in ``elcrec_dist.losses``.

Shapes: B users, T = max_len positions (left-padded, newest item at T-1), D = hidden size,
N items (ids 1..N, 0 is padding), k centres.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from elcrec_dist import numerics
from elcrec_dist.config import ModelConfig

# Subnormal floats flushed to zero for this process (``elcrec_dist.numerics``): here because
# every process that computes with the model imports this module before its first tensor
# operation, so torch's intra-op threads, created later, start with the setting.
numerics.apply()

# The reference adds -10000 to masked attention logits rather than -inf. For a padded query
# every key is masked, so its softmax becomes uniform-shifted attention over all keys instead of
# NaN; those padded outputs enter the mean-pooled user embedding (spec: mean over all T
# positions, padding included), so the finite value is part of the semantics.
MASK_VALUE = -10000.0


class Dropout(nn.Module):
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p).

    The same distribution as ``nn.Dropout``, drawn more cheaply on CPU, where ``F.dropout``
    draws its mask with ``bernoulli_`` (one Mersenne-Twister draw per element, on one thread)
    and was the largest single cost of a training step. At p = 0.5 (the spec's rate) every
    element needs one fair bit: 1/8 of a byte from numpy's PCG64, seeded with one draw from
    torch's default generator, so a step seeded with ``torch.manual_seed`` draws the same masks
    again. At other rates a ``torch.rand`` uniform is compared with p. On accelerators
    ``F.dropout`` (a fused kernel) is used as is.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        return x * keep_scale(x.shape, self.p).to(x.dtype)


@torch.compiler.disable  # host code (numpy): a compiled model calls it as it is
def keep_scale(shape: torch.Size, p: float) -> torch.Tensor:
    """A dropout mask for CPU: float32 [shape], 0 with probability p, else 1/(1-p)."""
    if p == 0.5:
        count = math.prod(shape)
        seed = int(torch.randint(0, 2**63 - 1, ()))  # torch's default generator
        packed = np.frombuffer(np.random.default_rng(seed).bytes((count + 7) // 8), dtype=np.uint8)
        bits = np.unpackbits(packed, count=count)  # 0 or 1, uint8
        return torch.from_numpy(np.multiply(bits, np.float32(2.0), dtype=np.float32)).view(shape)
    keep = torch.rand(shape, dtype=torch.float32) >= p
    return keep.to(torch.float32).mul_(1.0 / (1.0 - p))


class SelfAttention(nn.Module):
    """Multi-head self-attention with a post-LayerNorm residual."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.head_size = d // config.num_heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.dense = nn.Linear(d, d)
        self.attn_dropout = Dropout(config.attention_dropout)
        self.out_dropout = Dropout(config.hidden_dropout)
        self.layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def heads(self, inp: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        """One projection split into heads: [B, T', D] -> [B, H, T', Dh]."""
        b, t = inp.shape[:2]
        return proj(inp).view(b, t, self.num_heads, self.head_size).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, *, last_only: bool = False
    ) -> torch.Tensor:
        """x: [B, T, D]; mask: additive [B, 1, T, T] (0 or MASK_VALUE). Returns [B, T, D], or
        [B, 1, D] for the newest position only when ``last_only`` (keys and values still span
        all T positions)."""
        b, t, d = x.shape
        queries = x[:, -1:] if last_only else x
        if last_only:
            mask = mask[:, :, -1:]
            q = self.heads(queries, self.query)
            k, v = self.heads(x, self.key), self.heads(x, self.value)
        else:
            # One product for the three projections (their weights stacked, [3D, D]): the input
            # is read once and the backward accumulates one input gradient instead of three.
            weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])
            bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
            qkv = F.linear(x, weight, bias).view(b, t, 3, self.num_heads, self.head_size)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, T, Dh] each
        scores = (q @ k.transpose(-1, -2)) * self.head_size**-0.5 + mask  # [B, H, T', T]
        probs = self.attn_dropout(torch.softmax(scores, dim=-1))
        context = (probs @ v).transpose(1, 2).reshape(b, queries.shape[1], d)  # [B, T', D]
        return self.layer_norm(self.out_dropout(self.dense(context)) + queries)


class FeedForward(nn.Module):
    """Position-wise FFN (D -> 4D -> D, erf-GELU) with a post-LayerNorm residual."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.dense_1 = nn.Linear(d, 4 * d)
        self.dense_2 = nn.Linear(4 * d, d)
        self.dropout = Dropout(config.hidden_dropout)
        self.layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, D] (any T)."""
        hidden = self.dense_2(F.gelu(self.dense_1(x), approximate="none"))
        return self.layer_norm(self.dropout(hidden) + x)


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention = SelfAttention(config)
        self.feed_forward = FeedForward(config)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, *, last_only: bool = False
    ) -> torch.Tensor:
        return self.feed_forward(self.attention(x, mask, last_only=last_only))


class ELCRec(nn.Module):
    """SASRec encoder with a tied item table and k learnable centres ``cluster_centers`` [k, D]."""

    def __init__(self, config: ModelConfig, *, num_items: int) -> None:
        super().__init__()
        self.config = config
        self.num_items = num_items
        d = config.hidden_size
        # Row 0 is padding: padding_idx keeps its gradient at zero, but it is initialised like
        # every other row (the reference run does the same), so padded positions carry a small,
        # fixed random vector rather than zeros.
        self.item_embeddings = nn.Embedding(num_items + 1, d, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_len, d)
        self.layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.cluster_centers = nn.Parameter(torch.empty(config.num_clusters, d))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Replaced by the k-means start before the first step; a unit-norm random start keeps
        # the model usable (and the loss finite) if that start is skipped.
        with torch.no_grad():
            self.cluster_centers.normal_()
            self.cluster_centers.copy_(F.normalize(self.cluster_centers, dim=-1))

    def attention_mask(self, items: torch.Tensor) -> torch.Tensor:
        """Causal mask combined with a key-padding mask: [B, T] -> additive [B, 1, T, T]."""
        t = items.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=items.device).tril()  # [T, T]
        keep = causal[None, None] & (items > 0)[:, None, None, :]  # [B, 1, T, T]
        zero = torch.zeros((), dtype=self.layer_norm.weight.dtype, device=items.device)
        return torch.where(keep, zero, zero + MASK_VALUE)

    def forward(self, items: torch.Tensor, *, last_only: bool = False) -> torch.Tensor:
        """Encode left-padded item ids [B, T] (T == max_len) into hidden states E [B, T, D].

        ``last_only`` returns [B, 1, D], the newest position only, which is all ranking needs:
        the last block then computes one query per user instead of T (the same numbers as
        ``forward(items)[:, -1:]``; a test holds the two paths equal).
        """
        if items.dim() != 2 or items.shape[1] != self.config.max_len:
            raise ValueError(f"expected items [B, {self.config.max_len}], got {tuple(items.shape)}")
        positions = torch.arange(items.shape[1], device=items.device)
        x = self.item_embeddings(items) + self.position_embeddings(positions)[None]
        x = self.dropout(self.layer_norm(x))
        mask = self.attention_mask(items)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, last_only=last_only and i == len(self.blocks) - 1)
        return x

    def score_all(self, user_vectors: torch.Tensor) -> torch.Tensor:
        """Dot products with every item row, padding included: [B, D] -> [B, N + 1]."""
        return user_vectors @ self.item_embeddings.weight.T

    @staticmethod
    def user_vector(hidden: torch.Tensor) -> torch.Tensor:
        """Prediction vector: the newest position. [B, T, D] -> [B, D]."""
        return hidden[:, -1]

    @staticmethod
    def pooled(hidden: torch.Tensor) -> torch.Tensor:
        """Intent embedding: mean over all T positions, padding included. [B, T, D] -> [B, D]."""
        return hidden.mean(dim=1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


