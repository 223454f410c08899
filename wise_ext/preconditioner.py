"""Which entries a shard trains, and the direction its gradient steps take.

A gradient step on a linear layer moves the output of every input ``a`` by
``-lr * G a``; plain SGD therefore moves unrelated texts' outputs (and with them
their routing scores, and the earlier edits held in the same memory) as much as
the edit's own. Preconditioning the gradient with ``lam (K + lam I)^-1``, where
``K`` is the second moment of the inputs that must stay put (the reference
prompts' and the memory's earlier edits'), shrinks the step along exactly those
inputs: a ridge-regularised least-change update, as in ROME/MEMIT's
covariance-weighted edits, taken one SGD step at a time.

Shards by input feature (``WiseConfig.shard_by="feature"``) keep that
preconditioner exact: a shard trains every weight that reads a random subset of
the layer's input features (ratio rho), so ``K`` restricted to those features
is the whole story. Shards by entry (the paper's elementwise masks) are kept as
an option; their mask, applied after the preconditioner, only approximates it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops


def shard_features(n_features: int, mask_ratio: float, seed: int, device=None) -> Tensor:
    """The input features a feature shard trains: ``shard_mask`` over features, so the
    same seed picks the same features on every device. Never empty."""
    keep = ops.shard_mask((n_features,), mask_ratio, seed, device)
    if not bool(keep.any()):
        keep[seed % n_features] = True
    return keep


def second_moment(a: Tensor) -> Tensor:
    """Sum of ``a_t a_t^T`` over the rows of ``a`` (tokens x features), in fp32."""
    a = a.float()
    return a.T @ a


def ridge_preconditioner(moment: Tensor, features: Optional[Tensor], eps: float) -> Tensor:
    """``lam (K_ff + lam I)^-1`` on the shard's features ``f`` (None: all of them), with
    ``lam`` = eps x the mean of K's diagonal there (so eps is free of the activations' scale)."""
    k = (moment if features is None else moment[features][:, features]).double()
    lam = eps * float(k.diagonal().mean())
    if not lam > 0:  # no reference activation on these features: nothing to protect
        return torch.eye(k.shape[0], dtype=moment.dtype, device=moment.device)
    eye = torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
    return (lam * torch.linalg.inv(k + lam * eye)).to(moment.dtype)


def step_direction(grad: Tensor, features: Optional[Tensor], precond: Optional[Tensor], transpose: bool) -> Tensor:
    """The gradient on the shard's features (None: all of them), preconditioned; zero on
    every other weight. ``transpose``: GPT-2's Conv1D keeps input features on the rows."""
    if features is None:
        if precond is None:
            return grad
        g = grad.float()
        return (precond @ g if transpose else g @ precond).to(grad.dtype)
    out = torch.zeros_like(grad)
    if transpose:
        g = grad[features].float()
        out[features] = (g if precond is None else precond @ g).to(grad.dtype)
    else:
        g = grad[:, features].float()
        out[:, features] = (g if precond is None else g @ precond).to(grad.dtype)
    return out
