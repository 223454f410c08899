"""Typed wrappers of the ``torch.ops.wise_ext`` operators, with their fake
kernels (for ``torch.compile`` and meta tensors) and autograd formulas.

Each wrapper only adapts convenient Python arguments (lists, floats, 2-D inputs)
to the operator's schema; every check and all computation happen in C++.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loading the library registers the operators)

__all__ = [
    "ties_merge",
    "wise_ffn",
    "WiseFfnOutput",
    "routing_distance",
    "sharded_sgd_step_",
    "shard_mask",
    "ACTIVATIONS",
]

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")

_ops = torch.ops.wise_ext


def ties_merge(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Union[Sequence[float], Tensor],
    density: float,
    sparsify: str = "magnitude",
    consensus: str = "sum",
    normalize: bool = True,
    seed: int = 0,
) -> Tensor:
    """Merge ``tensors`` into ``base`` with the Ties family of methods.

    Deltas ``tensors[k] - base`` (fp32) are sparsified per tensor (``magnitude``:
    keep the ``int(density * numel)`` largest magnitudes, ties at the threshold
    kept; ``random``: keep each entry with probability ``density``;
    ``rescaled_random``: the same divided by ``density`` (DARE); ``none``), a sign
    is elected per entry (``sum``: of the weighted deltas; ``count``: of their
    signs; ``none``: no election) and the weighted deltas that agree with it are
    averaged (``normalize``) or summed. Returns ``base`` plus that, in base's dtype.

    Ties = magnitude+sum, DARE-Ties = rescaled_random+sum, linear = none+none.
    """
    if isinstance(weights, Tensor):
        weights = weights.detach().cpu().double().tolist()
    return _ops.ties_merge(base, list(tensors), [float(w) for w in weights], float(density), sparsify, consensus,
                           bool(normalize), int(seed))


class WiseFfnOutput(NamedTuple):
    out: Tensor      # (batch, tokens, out_features): the chosen memory's output
    scores: Tensor   # (batch, memories) fp32: each side memory's routing score
    choice: Tensor   # (batch,) int64: the side memory answering, or -1 for the main one


def wise_ffn(
    a: Tensor,
    w_main: Tensor,
    w_sides: Tensor,
    bias: Optional[Tensor],
    thresholds: Union[Tensor, Sequence[float], float],
    token_mask: Optional[Tensor] = None,
    reduce: str = "mean",
    act: str = "none",
    transpose: bool = False,
    select: str = "score",
) -> WiseFfnOutput:
    """The WISE layer at inference: main and side memories with per-sequence routing.

    ``a`` is (batch, tokens, in) or (tokens, in); ``w_main`` is (out, in), or
    (in, out) with ``transpose=True`` (GPT-2 ``Conv1D``); ``w_sides`` stacks M
    side memories shaped like ``w_main`` as (M, ...), or is one of them.
    Sequence b is answered by the side memory with the highest score
    (mean / max / auto of ``||act(a W_m^T) - act(a W_main^T)||`` over its
    unmasked tokens) when that score exceeds ``thresholds[m]``, else by the main
    memory. ``select="latest"`` instead picks the last memory (highest m) whose
    score exceeds its threshold: for memories each trained to stay under the
    earlier ones' edits (WISE-Retrieve with replay). The decision stays on the
    device.
    """
    squeeze = a.dim() == 2
    if squeeze:
        a = a.unsqueeze(0)
        token_mask = None if token_mask is None else token_mask.reshape(1, -1)
    if w_sides.dim() == 2:
        w_sides = w_sides.unsqueeze(0)
    if not isinstance(thresholds, Tensor):
        thresholds = torch.tensor(thresholds, dtype=torch.float32, device=a.device).reshape(-1)
    out, scores, choice = _ops.wise_ffn(a, w_main, w_sides, bias, thresholds, token_mask, reduce, act, bool(transpose),
                                       select)
    if squeeze:
        out = out.squeeze(0)
    return WiseFfnOutput(out, scores, choice)


def routing_distance(y_main: Tensor, y_side: Tensor, act: str = "none") -> Tensor:
    """Per-row ``||act(y_side) - act(y_main)||_2`` over the last dimension, in fp32
    (fp64 for fp64 inputs). Differentiable in both arguments."""
    return _ops.routing_distance(y_main, y_side, act)


def sharded_sgd_step_(
    w: Tensor,
    grad: Tensor,
    w0: Tensor,
    lr: float,
    weight_decay: float,
    mask_ratio: float,
    seed: int,
    norm_constraint: float,
) -> None:
    """In place: ``w <- clamp(w - lr * m * (grad + weight_decay * w), w0 - c, w0 + c)``
    on the shard's entries (``m = shard_mask(w.shape, mask_ratio, seed)``), leaving
    every other entry untouched. ``norm_constraint=inf`` disables the bound."""
    _ops.sharded_sgd_step_(w, grad, w0, float(lr), float(weight_decay), float(mask_ratio), int(seed),
                           float(norm_constraint))


def shard_mask(shape: Sequence[int], mask_ratio: float, seed: int,
               device: Optional[Union[torch.device, str]] = None) -> Tensor:
    """The bool mask a shard with this seed trains: Bernoulli(mask_ratio) per element,
    the same bits on every device."""
    if isinstance(shape, int):
        shape = (shape,)
    return _ops.shard_mask(list(shape), float(mask_ratio), int(seed), None if device is None else torch.device(device))


# ---- fake kernels: shapes and dtypes only, for torch.compile and meta tensors ----

def _score_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _same_device(op: str, first: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device}, expected {first.device} like the other inputs")


@torch.library.register_fake("wise_ext::ties_merge")
def _ties_merge_fake(base, tensors, weights, density, sparsify="magnitude", consensus="sum", normalize=True, seed=0):
    _same_device("ties_merge", base, **{f"tensors[{k}]": t for k, t in enumerate(tensors)})
    return torch.empty_like(base, memory_format=torch.contiguous_format)


@torch.library.register_fake("wise_ext::wise_ffn")
def _wise_ffn_fake(a, w_main, w_sides, bias, thresholds, token_mask, reduce="mean", act="none", transpose=False,
                   select="score"):
    _same_device("wise_ffn", a, w_main=w_main, w_sides=w_sides, bias=bias, thresholds=thresholds,
                 token_mask=token_mask)
    batch, tokens = a.shape[0], a.shape[1]
    out_features = w_main.shape[1] if transpose else w_main.shape[0]
    return (
        a.new_empty((batch, tokens, out_features)),
        a.new_empty((batch, w_sides.shape[0]), dtype=_score_dtype(a)),
        a.new_empty((batch,), dtype=torch.long),
    )


@torch.library.register_fake("wise_ext::routing_distance")
def _routing_distance_fake(y_main, y_side, act="none"):
    _same_device("routing_distance", y_main, y_side=y_side)
    return y_main.new_empty(y_main.shape[:-1], dtype=_score_dtype(y_main))


@torch.library.register_fake("wise_ext::routing_distance_backward")
def _routing_distance_backward_fake(grad, y_main, y_side, distance, act):
    return torch.empty_like(y_main, memory_format=torch.contiguous_format), torch.empty_like(
        y_side, memory_format=torch.contiguous_format)


@torch.library.register_fake("wise_ext::sharded_sgd_step_")
def _sharded_sgd_step_fake(w, grad, w0, lr, weight_decay, mask_ratio, seed, norm_constraint):
    _same_device("sharded_sgd_step_", w, grad=grad, w0=w0)


@torch.library.register_fake("wise_ext::shard_mask_")
def _shard_mask_fill_fake(mask, mask_ratio, seed):
    return None


@torch.library.register_fake("wise_ext::shard_mask")
def _shard_mask_fake(shape, mask_ratio, seed, device=None):
    return torch.empty(shape, dtype=torch.bool, device=device)


# ---- autograd ----

def _routing_distance_setup(ctx, inputs, output):
    y_main, y_side, act = inputs
    ctx.save_for_backward(y_main, y_side, output)
    ctx.act = act


def _routing_distance_backward(ctx, grad):
    y_main, y_side, distance = ctx.saved_tensors
    grad_main, grad_side = _ops.routing_distance_backward(grad, y_main, y_side, distance, ctx.act)
    return grad_main, grad_side, None


torch.library.register_autograd("wise_ext::routing_distance", _routing_distance_backward,
                                setup_context=_routing_distance_setup)
