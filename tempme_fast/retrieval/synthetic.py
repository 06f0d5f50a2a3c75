"""Random video-caption pairs shaped like the retrieval datasets' batches, for smoke runs and benchmarks."""
from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["SyntheticPairs"]


class SyntheticPairs:
    """``n`` random video-caption pairs in batches of ``(video, tokens, mask)``, for smoke runs.

    Pair ``i`` is the same tensors whatever the epoch, batch or process; epoch ``e`` visits the pairs
    in an order drawn from ``seed + e``. With ``world_size > 1`` each process yields its
    ``batch_size // world_size`` share of every global batch of ``batch_size``. Incomplete last
    batches are dropped.

    Tokens: random ids in ``[1, vocab_size - 1)``, an end token ``vocab_size - 1`` (CLIP's EOT, which
    its text pooling finds with argmax) at a random position, zeros after it.
    """

    def __init__(self, n: int, batch_size: int, frames: int, image_size: int = 224, context_length: int = 32,
                 vocab_size: int = 49408, seed: int = 0, rank: int = 0, world_size: int = 1):
        if n < 1 or batch_size < 1 or n < batch_size:
            raise ValueError(f"need n >= batch_size >= 1, got n={n}, batch_size={batch_size}")
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} must be divisible by the {world_size} processes")
        if context_length < 3 or vocab_size < 3:
            raise ValueError(f"context_length={context_length} and vocab_size={vocab_size} must be >= 3")
        self.n, self.batch_size, self.frames, self.image_size = n, batch_size, frames, image_size
        self.context_length, self.vocab_size, self.seed = context_length, vocab_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def __len__(self) -> int:
        return self.n // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def pair(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        video = torch.randn(self.frames, 3, self.image_size, self.image_size, generator=g)
        tokens = torch.randint(1, self.vocab_size - 1, (self.context_length,), generator=g)
        end = int(torch.randint(2, self.context_length, (1,), generator=g))
        tokens[end] = self.vocab_size - 1
        tokens[end + 1:] = 0
        return video, tokens

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        share = self.batch_size // self.world_size
        for b in range(len(self)):
            ids = order[b * self.batch_size:(b + 1) * self.batch_size][self.rank * share:(self.rank + 1) * share]
            videos, tokens = zip(*(self.pair(int(i)) for i in ids))
            yield torch.stack(videos), torch.stack(tokens), torch.ones(len(ids), self.frames, dtype=torch.bool)
