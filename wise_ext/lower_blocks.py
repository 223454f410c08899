"""Running the blocks below the edited layer once per edit instead of once per step."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .surgery import decoder_blocks


@contextlib.contextmanager
def frozen_lower_blocks(model: nn.Module, block_index: int, batch: dict):
    """Within the context, blocks [0, block_index) return the outputs they gave
    for ``batch`` on entry, without computing: nothing below the edited layer
    changes while an edit trains, so each optimisation step runs only the
    edited block and those above it. Only valid for calls on that same batch."""
    _, blocks = decoder_blocks(model)
    lower = list(blocks[:block_index])
    if not lower:
        yield
        return
    outputs = {}
    hooks = [blk.register_forward_hook(lambda mod, args, out, i=i: outputs.__setitem__(i, out))
             for i, blk in enumerate(lower)]
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    for i, blk in enumerate(lower):
        blk.forward = lambda *args, _out=outputs[i], **kwargs: _out
    try:
        yield
    finally:
        for blk in lower:
            del blk.forward
