"""The edited layer's inputs for a set of texts, kept token by token, and their routing scores.

Texts of any lengths sit side by side without padding: the rows' valid tokens are
stacked and each token knows its row. The layer's input for a text never changes
while editing (nothing below the edited layer is trained), so the scores of any
side memory on these texts cost one product with it, not a forward of the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import ops

LONG_SEQUENCE = 100  # token_reduce "auto": past this many tokens a sequence is scored by its largest distance


@dataclass
class TokenRows:
    a: Tensor        # (tokens, in) the layer's input
    y_main: Tensor   # (tokens, out) the main memory's output
    row: Tensor      # (tokens,) int64: which text each token belongs to
    n_rows: int

    @classmethod
    def from_batch(cls, a: Tensor, y_main: Tensor, attention_mask: Tensor) -> "TokenRows":
        keep = attention_mask.bool()
        row = torch.arange(a.shape[0], device=a.device).unsqueeze(1).expand_as(keep)[keep]
        return cls(a[keep], y_main[keep], row, a.shape[0])

    @classmethod
    def cat(cls, parts: list["TokenRows"]) -> "TokenRows":
        rows, n = [], 0
        for p in parts:
            rows.append(p.row + n)
            n += p.n_rows
        return cls(torch.cat([p.a for p in parts]), torch.cat([p.y_main for p in parts]), torch.cat(rows), n)

    def select(self, keep: Tensor) -> "TokenRows":
        """The rows where ``keep`` (bool, one per row) holds, numbered in their order."""
        tokens = keep[self.row]
        number = torch.cumsum(keep, 0) - 1
        return TokenRows(self.a[tokens], self.y_main[tokens], number[self.row[tokens]], int(keep.sum()))

    def distances(self, y_side: Tensor, act: str) -> Tensor:
        return ops.routing_distance(self.y_main, y_side, act)

    def counts(self) -> Tensor:
        """Tokens per row."""
        return torch.bincount(self.row, minlength=self.n_rows)

    def mean(self, per_token: Tensor, counts: Optional[Tensor] = None) -> Tensor:
        """Per row, the mean over its tokens (differentiable)."""
        counts = self.counts() if counts is None else counts
        return per_token.new_zeros(self.n_rows).index_add(0, self.row, per_token) / counts.clamp(min=1)

    def reduce(self, per_token: Tensor, how: str) -> Tensor:
        """Per row, as inference reduces a sequence's token scores (``WiseLayer.token_reduce``)."""
        if how == "mean":
            return self.mean(per_token)
        top = per_token.new_full((self.n_rows,), float("-inf")).scatter_reduce(0, self.row, per_token, "amax")
        if how == "max":
            return top
        counts = self.counts()
        return torch.where(counts > LONG_SEQUENCE, top, self.mean(per_token, counts))
