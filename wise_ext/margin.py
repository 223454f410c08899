"""The routing margin's terms on the texts an edit must leave to other memories."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .token_rows import TokenRows


@dataclass
class KeptTexts:
    """The texts whose routing scores an edit keeps down, each under its own ceiling.

    References (unrelated texts) stay under alpha, and the edit's rows lead them by
    gamma. In retrieve mode with replay, a frozen memory's edits stay under the score
    that picks their memory now, less gamma (never asked under alpha): inference picks
    the highest score, so the memory in training only has to lose to the one that
    holds the edit, not to stay silent on every prompt shaped like its own edits.
    ``rivals`` are those frozen memories: the edit's own rows must beat them by gamma."""
    rows: TokenRows
    n_texts: int      # what the mean is over: joined references are constraints on the texts they join, not texts
    ceiling: Tensor   # (n_rows,) the score each row stays under
    led: Tensor       # (n_rows,) bool: the edit's rows lead this one by gamma (the references)
    rivals: list = field(default_factory=list)


def kept_margin(texts: KeptTexts, score: Callable[[TokenRows], Tensor], s_edit: Tensor, gamma: float) -> Tensor:
    """Sum over the rows, divided by n_texts, of relu(s - ceiling), and over (edit row, led
    row) pairs, divided by n_texts x edit rows, of relu(gamma - (s_edit - s)). ``score``
    gives the differentiable score per row. Only the rows that one of them binds are
    differentiated: most sit under both, and the backward through their scores
    (thousands of reference tokens) was most of a step's cost."""
    rows = texts.rows
    with torch.no_grad():
        s_all = score(rows)
        binding = (s_all > texts.ceiling) | (texts.led & (s_all > s_edit.min() - gamma))
    live = rows.select(binding)
    if live.n_rows == 0:
        return s_edit.new_zeros(())
    s = score(live)
    led = texts.led[binding]
    return (torch.relu(s - texts.ceiling[binding]).sum() / texts.n_texts
            + torch.relu(gamma - (s_edit[:, None] - s[led][None, :])).sum() / (texts.n_texts * s_edit.numel()))
