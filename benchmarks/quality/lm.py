"""A tiny decoder-only language model and offline text, shared by the examples and the quality study.

Legend: B sequences, S positions, H hidden size, V vocabulary.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

import torch
from torch import nn


class Block(nn.Module):
    """A pre-norm causal transformer block whose MLP is any (..., H) -> (..., H) module."""

    def __init__(self, hidden: int, heads: int, mlp: nn.Module):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.mlp = mlp

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        S = x_BSH.shape[1]
        causal = torch.triu(torch.ones(S, S, dtype=torch.bool, device=x_BSH.device), diagonal=1)
        h = self.norm1(x_BSH)
        x_BSH = x_BSH + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x_BSH + self.mlp(self.norm2(x_BSH))


class TinyLM(nn.Module):
    """Embedding + learned positions + ``layers`` blocks (MLP from ``make_mlp()``) + final norm + LM head.
    ids (B, S) int64 -> logits (B, S, V)."""

    def __init__(self, vocab: int, hidden: int, layers: int, seq: int, make_mlp: Callable[[], nn.Module],
                 heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.pos = nn.Parameter(torch.zeros(seq, hidden))
        self.blocks = nn.ModuleList(Block(hidden, heads, make_mlp()) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids_BS: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids_BS) + self.pos[: ids_BS.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def load_text(path: Optional[str], max_bytes: int) -> bytes:
    """Up to ``max_bytes`` of text: the file at ``path``, or the Python standard library's own ``*.py`` sources
    (present on every machine with Python, so nothing is downloaded), in sorted file order."""
    if path:
        return Path(path).read_bytes()[:max_bytes]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for file in sorted(stdlib.glob("*.py")):
        data = file.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"\n".join(chunks)[:max_bytes]


def byte_batches(data_N: torch.Tensor, batch: int, seq: int, generator: torch.Generator
                 ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Endless (inputs (B, S), next-byte targets (B, S)) windows at random offsets of a uint8/int64 stream."""
    while True:
        starts = torch.randint(0, data_N.numel() - seq - 1, (batch,), generator=generator)
        window = torch.stack([data_N[s: s + seq + 1] for s in starts.tolist()]).long()
        yield window[:, :-1], window[:, 1:]
