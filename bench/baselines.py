"""The plain-PyTorch ways users do these things today, measured beside wise_ext.

ties_merge_topk follows what EasyEdit's GTA, mergekit's TIES and PEFT's ties do:
a K x numel stack of deltas, a topk per tensor for the trim, then a masked mean.
wise_layer_unfused follows EasyEdit's WISE layer at inference: two products, a
torch norm per token, and a Python-side decision (one host sync per call).
"""
import torch
import torch.nn.functional as F


def ties_merge_topk(base, tensors, weights, density):
    deltas = torch.stack([t - base for t in tensors])
    flat = deltas.reshape(len(tensors), -1)
    k = int(density * flat.shape[1])
    kth = flat.abs().topk(k, dim=1).values[:, -1:]
    trimmed = flat * (flat.abs() >= kth)
    w = torch.tensor(weights, dtype=flat.dtype).unsqueeze(1)
    weighted = trimmed * w
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    num = (weighted * agree).sum(0)
    den = (w * agree).sum(0)
    den[den == 0] = 1
    return base + (num / den).reshape(base.shape)


def wise_layer_unfused(a, w_main, w_side, threshold):
    y0 = F.linear(a, w_main)
    y1 = F.linear(a, w_side)
    score = torch.norm(y1 - y0, dim=-1).mean()
    return y1 if score.item() > threshold else y0


def two_products(a, w_main, w_side):
    return F.linear(a, w_main), F.linear(a, w_side)
