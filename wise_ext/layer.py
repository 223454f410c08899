"""WiseLayer: one FFN value matrix with its side memories and the routing between them."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .surgery import is_transposed


@dataclass
class EditingState:
    """Set on the layer while an edit trains one of its memories."""
    weight: Tensor                     # leaf sharing storage with memories[index]; gradients land here
    y_main: Optional[Tensor] = None    # the main memory's output: the layer's input is fixed within an edit
    distances: Optional[Tensor] = None # (batch, tokens) routing distance of the last forward


class WiseLayer(nn.Module):
    """Wraps an ``nn.Linear`` or GPT-2 ``Conv1D``. The main memory is the wrapped
    module's own weight (the base model's tensor, never copied or changed); the
    side memories are stacked in one (M, ...) buffer with one routing threshold
    each. Inference goes through ``wise_ffn``: per sequence, the side memory with
    the highest routing score (``select="latest"``: the newest memory) answers when
    that score exceeds its threshold."""

    def __init__(self, base_layer: nn.Module, routing_act: str = "none", token_reduce: str = "auto",
                 sticky_routing: bool = False, select: str = "score"):
        super().__init__()
        self.base_layer = base_layer
        self.transpose = is_transposed(base_layer)
        w = base_layer.weight
        self.register_buffer("memories", w.detach().new_empty((0, *w.shape)))
        self.register_buffer("thresholds", torch.empty(0, dtype=torch.float32, device=w.device))
        self.routing_act = routing_act
        self.token_reduce = token_reduce
        self.sticky_routing = sticky_routing
        self.select = select
        self.enabled = True
        self.editing: Optional[EditingState] = None
        self.token_mask: Optional[Tensor] = None   # the model call's attention mask, set by a hook
        self.last_scores: Optional[Tensor] = None  # (batch, M) of the last routed call
        self.last_choice: Optional[Tensor] = None  # (batch,) of the last routed call, -1 = main

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return getattr(self.base_layer, "bias", None)

    @property
    def num_memories(self) -> int:
        return self.memories.shape[0]

    # ---- memories ----
    def add_memory(self, init: Tensor, threshold: float = float("inf")) -> int:
        """Appends a side memory initialised from ``init``; returns its index."""
        if init.shape != self.weight.shape:
            raise ValueError(f"WiseLayer.add_memory: init has shape {tuple(init.shape)}, "
                             f"expected the main weight's {tuple(self.weight.shape)}")
        self.memories = torch.cat([self.memories, init.detach().to(self.memories).unsqueeze(0)])
        self.thresholds = torch.cat([self.thresholds, self.thresholds.new_tensor([threshold])])
        return self.num_memories - 1

    def remove_memories(self, indices) -> None:
        keep = [m for m in range(self.num_memories) if m not in set(indices)]
        self.memories = self.memories[keep].contiguous()
        self.thresholds = self.thresholds[keep].contiguous()

    def set_threshold(self, index: int, value: float) -> None:
        self.thresholds[index] = value

    def load_memories(self, memories: Tensor, thresholds: Tensor) -> None:
        if memories.shape[1:] != self.weight.shape:
            raise ValueError(f"memories have shape {tuple(memories.shape[1:])}, "
                             f"expected the main weight's {tuple(self.weight.shape)}")
        self.memories = memories.to(self.weight).contiguous()
        self.thresholds = thresholds.to(device=self.weight.device, dtype=torch.float32).contiguous()

    @contextlib.contextmanager
    def disabled(self):
        """Runs the wrapped layer alone: the unedited model."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    # ---- forward ----
    def linear(self, a: Tensor, weight: Tensor, bias: bool = True) -> Tensor:
        b = self.bias if bias else None
        if self.transpose:
            flat = a.reshape(-1, a.shape[-1])
            y = flat @ weight if b is None else torch.addmm(b, flat, weight)
            return y.reshape(*a.shape[:-1], weight.shape[-1])
        return F.linear(a, weight, b)

    def forward(self, a: Tensor) -> Tensor:
        if self.editing is not None:
            return self._editing_forward(a)
        if not self.enabled or self.num_memories == 0:
            return self.base_layer(a)
        lead = a.shape[:-1]
        a3 = a.reshape(-1, *a.shape[-2:]) if a.dim() >= 3 else a.unsqueeze(0)
        if (self.sticky_routing and a3.shape[1] == 1 and self.last_choice is not None
                and self.last_choice.shape[0] == a3.shape[0]):
            return self._forward_with_choice(a3, self.last_choice).reshape(*lead, -1)
        out, scores, choice = ops.wise_ffn(a3, self.weight, self.memories, self.bias, self.thresholds,
                                           self._mask_for(a3), self.token_reduce, self.routing_act, self.transpose,
                                           self.select)
        self.last_scores, self.last_choice = scores, choice
        return out.reshape(*lead, -1)

    def _mask_for(self, a3: Tensor) -> Optional[Tensor]:
        m = self.token_mask
        if m is None or m.dim() != 2 or m.shape[0] != a3.shape[0] or m.shape[1] < a3.shape[1]:
            return None
        return m[:, -a3.shape[1]:]

    def _forward_with_choice(self, a3: Tensor, choice: Tensor) -> Tensor:
        # Generated tokens keep the prompt's decision (sticky routing): no new scores.
        y0 = self.base_layer(a3)
        ys = torch.stack([self.linear(a3, self.memories[m]) for m in range(self.num_memories)])
        picked = ys[choice.clamp(min=0), torch.arange(a3.shape[0], device=a3.device)]
        return torch.where((choice >= 0).view(-1, 1, 1), picked, y0)

    def _editing_forward(self, a: Tensor) -> Tensor:
        state = self.editing
        if state.y_main is None or state.y_main.shape[:-1] != a.shape[:-1]:
            with torch.no_grad():
                state.y_main = self.base_layer(a)
        y_side = self.linear(a, state.weight)
        state.distances = ops.routing_distance(state.y_main, y_side, self.routing_act)
        return y_side

    def extra_repr(self) -> str:
        return (f"memories={self.num_memories}, transpose={self.transpose}, act={self.routing_act}, "
                f"reduce={self.token_reduce}, sticky={self.sticky_routing}, select={self.select}")


def routing_mask(attention_mask: Optional[Tensor], input_ids: Optional[Tensor], bos_token_id: Optional[int]):
    """The tokens that route: not padding, and not the start token, whose input to the
    layer is the same in every sequence (often a massive outlier), so its distance
    only shifts every score alike. A sequence made of the start token alone keeps it."""
    if input_ids is None or bos_token_id is None:
        return attention_mask
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool().clone()
    tail = mask[:, -input_ids.shape[1]:]
    content = tail & (input_ids != bos_token_id)
    tail.copy_(torch.where(content.any(1, keepdim=True), content, tail))
    return mask


def bind_attention_mask(model: nn.Module, layer: WiseLayer) -> list:
    """Hands each model call's routing mask (see ``routing_mask``) to the layer."""
    bos = getattr(model.config, "bos_token_id", None)

    def before(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], Tensor):
            mask = args[1]
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], Tensor) else None)
        layer.token_mask = routing_mask(mask, ids if isinstance(ids, Tensor) and ids.dim() == 2 else None, bos)

    def after(module, args, kwargs, output):
        layer.token_mask = None

    return [model.register_forward_pre_hook(before, with_kwargs=True),
            model.register_forward_hook(after, with_kwargs=True)]
