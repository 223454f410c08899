"""The fixed part of an edit, computed once instead of once per optimisation step.

While an edit trains, only the side memory changes. Everything below the edited
layer, and the edited layer's input, stay the same, so one capture pass records
the outputs of the blocks below, the edited block's output and the layer's input
and main output. Each step then recomputes only the side memory's output and the
blocks above it; when the edited projection adds straight into the residual
stream (LLaMA/Mistral/Qwen2 down_proj, GPT-2 c_proj, GPT-J fc_out), the edited
block's output is its recorded output plus (side output - main output), and the
block's attention and up-projections do not run at all.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor, nn

from .layer import EditingState, WiseLayer
from .surgery import decoder_blocks


def layer_inputs(model: nn.Module, layer: WiseLayer, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """The edited layer's input and its main memory's output for a batch (no side memory)."""
    seen = {}
    hook = layer.base_layer.register_forward_hook(lambda mod, args, out: seen.update(a=args[0], y=out))
    try:
        with torch.no_grad(), layer.disabled():
            model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        hook.remove()
    return seen["a"], seen["y"]


def _plus(output, delta: Tensor):
    if isinstance(output, tuple):
        return (output[0] + delta,) + tuple(output[1:])
    return output + delta


class EditSession(contextlib.AbstractContextManager):
    """Within the session, ``hidden()`` runs the model on the session's batch with the
    side memory ``weight`` in place of the main one, computing only what changes."""

    def __init__(self, model: nn.Module, layer: WiseLayer, block_index: int, inputs: dict, weight: Tensor,
                 additive: Optional[bool] = None):
        self.model, self.layer, self.inputs = model, layer, inputs
        _, blocks = decoder_blocks(model)
        self.lower = list(blocks[:block_index])
        self.block = blocks[block_index]
        self.weight = weight
        self.additive = additive
        self._outputs: dict[int, object] = {}

    def __enter__(self):
        layer, blocks = self.layer, self.lower + [self.block]
        call = {}
        hooks = [b.register_forward_hook(lambda mod, args, out, i=i: self._outputs.__setitem__(i, out))
                 for i, b in enumerate(blocks)]
        hooks.append(self.block.register_forward_pre_hook(
            lambda mod, args, kwargs: call.update(args=args, kwargs=kwargs), with_kwargs=True))
        try:
            a, y_main = layer_inputs(self.model, layer, self.inputs["input_ids"], self.inputs["attention_mask"])
        finally:
            for h in hooks:
                h.remove()
        if self.additive is None:
            self.additive = self._adds_into_block_output(call, y_main)
        for i, blk in enumerate(self.lower):
            blk.forward = lambda *args, _out=self._outputs[i], **kwargs: _out
        self.layer_input = a
        layer.editing = EditingState(weight=self.weight, y_main=y_main)
        if self.additive:
            out = self._outputs[len(self.lower)]
            self.block.forward = lambda *args, **kwargs: _plus(out, layer(a) - y_main)
        return self

    def __exit__(self, *exc):
        self.layer.editing = None
        for blk in self.lower + [self.block]:
            blk.__dict__.pop("forward", None)
        return False

    def _adds_into_block_output(self, call: dict, y_main: Tensor) -> bool:
        """Whether the block's output moves by exactly what the edited layer's output moves."""
        if "args" not in call:
            return False
        bump = torch.randn_like(y_main)
        hook = self.layer.base_layer.register_forward_hook(lambda mod, args, out: out + bump)
        try:
            with torch.no_grad(), self.layer.disabled():
                bumped = self.block(*call["args"], **call["kwargs"])
        finally:
            hook.remove()
        first = lambda o: o[0] if isinstance(o, tuple) else o  # noqa: E731
        expected = first(self._outputs[len(self.lower)]) + bump
        tol = 1e-2 if y_main.dtype in (torch.float16, torch.bfloat16) else 1e-4
        return torch.allclose(first(bumped).float(), expected.float(), rtol=tol, atol=tol * bump.abs().max().item())

    def hidden(self) -> Tensor:
        """The final hidden states (after the last norm) of the session's batch."""
        return self.model.base_model(**self.inputs, use_cache=False).last_hidden_state

    @property
    def distances(self) -> Tensor:
        """(batch, tokens) routing distances of the last ``hidden()`` call."""
        return self.layer.editing.distances


def answer_logits(model: nn.Module, hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Logits at the positions that predict a labelled token, and those tokens: the LM
    head (vocabulary-wide, the costliest matrix of a small model) runs on them alone."""
    target = labels[:, 1:]
    keep = target != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits, target[keep]
