"""Plain-PyTorch specification of every wise_ext operator.

These functions define what the C++ and CUDA kernels compute; the tests hold
the kernels to them. They favour clarity over speed (they materialise K x numel
temporaries and call topk), and they perform the same fp32 operations in the
same order as the kernels, so fp32 results agree to the last bit on the CPU.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_M32 = 0xFFFFFFFF
SHARD_STREAM = 0xA5A5A5A5


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    # 32x32 -> 64-bit product in int64 arithmetic, split so nothing overflows.
    x = a * (b >> 16)
    y = a * (b & 0xFFFF)
    s = ((x & 0xFFFF) << 16) + y
    return s & _M32, (x >> 16) + (s >> 32)


def philox4x32_10(counter: Sequence[Tensor], key: tuple[int, int]) -> list[Tensor]:
    """Philox4x32-10 on int64 tensors holding uint32 words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        if r:
            k0 = (k0 + 0x9E3779B9) & _M32
            k1 = (k1 + 0xBB67AE85) & _M32
        lo0, hi0 = _mulhilo(0xD2511F53, c0)
        lo1, hi1 = _mulhilo(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def random_words(numel: int, seed: int, stream: int, device=None) -> Tensor:
    """The uint32 word (in int64) that element i draws: word i % 4 of Philox block i // 4."""
    blocks = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    seed &= (1 << 64) - 1
    words = philox4x32_10([blocks & _M32, blocks >> 32, torch.full_like(blocks, stream), torch.zeros_like(blocks)],
                          (seed & _M32, seed >> 32))
    return torch.stack(words, dim=1).reshape(-1)[:numel]


def bernoulli_from_words(words: Tensor, p: float) -> Tensor:
    uniform = (words >> 8).to(torch.float32) * (1.0 / 16777216.0)
    return uniform < torch.tensor(p, dtype=torch.float32)


def shard_mask(shape: Sequence[int], mask_ratio: float, seed: int, device=None) -> Tensor:
    numel = 1
    for s in shape:
        numel *= s
    return bernoulli_from_words(random_words(numel, seed, SHARD_STREAM, device), mask_ratio).reshape(tuple(shape))


def ties_merge(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], density: float,
               sparsify: str = "magnitude", consensus: str = "sum", normalize: bool = True, seed: int = 0) -> Tensor:
    b = base.float().reshape(-1)
    numel = b.numel()
    kept = []
    for k, t in enumerate(tensors):
        d = t.float().reshape(-1) - b
        if sparsify == "magnitude":
            n = int(density * numel)
            if n <= 0:
                d = torch.zeros_like(d)
            elif n < numel:
                tau = torch.topk(d.abs(), n).values[-1]
                d = torch.where(d.abs() >= tau, d, torch.zeros_like(d))
        elif sparsify in ("random", "rescaled_random"):
            keep = bernoulli_from_words(random_words(numel, seed, k, base.device), density)
            if sparsify == "rescaled_random":
                d = d * (1.0 / density)
            d = torch.where(keep, d, torch.zeros_like(d))
        elif sparsify != "none":
            raise ValueError(f"unknown sparsify {sparsify!r}")
        kept.append(d)
    w = [torch.tensor(float(x), dtype=torch.float32) for x in weights]
    elect = torch.zeros_like(b)
    if consensus == "sum":
        for wk, d in zip(w, kept):
            elect = elect + wk * d
    elif consensus == "count":
        for d in kept:
            elect = elect + torch.sign(d)
    positive = elect >= 0
    num = torch.zeros_like(b)
    den = torch.zeros_like(b)
    for wk, d in zip(w, kept):
        agree = torch.ones_like(positive) if consensus == "none" else torch.where(positive, d > 0, d < 0)
        num = torch.where(agree, num + wk * d, num)
        den = torch.where(agree, den + wk, den)
    merged = num / torch.where(den == 0, torch.ones_like(den), den) if normalize else num
    return (b + merged).to(base.dtype).reshape(base.shape)


def activation(y: Tensor, act: str) -> Tensor:
    if act == "none":
        return y
    if act == "relu":
        return torch.relu(y)
    if act == "gelu":
        return F.gelu(y)
    if act == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if act == "silu":
        return F.silu(y)
    raise ValueError(f"unknown act {act!r}")


def _score_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def routing_distance(y_main: Tensor, y_side: Tensor, act: str = "none") -> Tensor:
    dt = _score_dtype(y_main)
    return torch.linalg.vector_norm(activation(y_side.to(dt), act) - activation(y_main.to(dt), act), dim=-1)


def linear(a: Tensor, w: Tensor, bias: Optional[Tensor], transpose: bool) -> Tensor:
    """nn.Linear (weight (out, in)) or GPT-2 Conv1D (weight (in, out)) on a."""
    if transpose:
        y = a.reshape(-1, a.shape[-1]) @ w if bias is None else torch.addmm(bias, a.reshape(-1, a.shape[-1]), w)
        return y.reshape(*a.shape[:-1], w.shape[-1])
    return F.linear(a, w, bias)


def wise_ffn(a: Tensor, w_main: Tensor, w_sides: Tensor, bias: Optional[Tensor], thresholds: Tensor,
             token_mask: Optional[Tensor] = None, reduce: str = "mean", act: str = "none",
             transpose: bool = False, select: str = "score") -> tuple[Tensor, Tensor, Tensor]:
    batch, tokens, _ = a.shape
    y0 = linear(a, w_main, bias, transpose)
    ys = [linear(a, w_sides[m], bias, transpose) for m in range(w_sides.shape[0])]
    mask = torch.ones(batch, tokens, dtype=torch.bool) if token_mask is None else token_mask.bool().cpu()
    scores = torch.zeros(batch, len(ys), dtype=_score_dtype(a))
    choice = torch.full((batch,), -1, dtype=torch.long)
    out = y0.clone()
    for b in range(batch):
        count = int(mask[b].sum())
        use_max = reduce == "max" or (reduce == "auto" and count > 100)
        for m, y in enumerate(ys):
            d = routing_distance(y0[b], y[b], act).cpu()[mask[b]]
            if count:
                scores[b, m] = d.max() if use_max else d.mean()
        fires = scores[b] > thresholds.float().cpu()
        if select == "latest":
            best = int(fires.nonzero().max()) if fires.any() else -1
        else:
            best = int(torch.argmax(scores[b]))  # the first maximum, as the kernels pick
            best = best if fires[best] else -1
        if best >= 0:
            choice[b] = best
            out[b] = ys[best][b]
    return out, scores.to(a.device), choice.to(a.device)


def sharded_sgd_step(w: Tensor, grad: Tensor, w0: Tensor, lr: float, weight_decay: float, mask_ratio: float,
                     seed: int, norm_constraint: float) -> Tensor:
    """Returns the updated copy of w (the operator updates w in place)."""
    f32 = torch.float32
    wf = w.float()
    step = torch.tensor(lr, dtype=f32) * (grad.float() + torch.tensor(weight_decay, dtype=f32) * wf)
    new = wf - step
    c = torch.tensor(norm_constraint, dtype=f32)
    new = torch.minimum(torch.maximum(new, w0.float() - c), w0.float() + c)
    mask = shard_mask(w.shape, mask_ratio, seed, w.device)
    return torch.where(mask, new.to(w.dtype), w)
