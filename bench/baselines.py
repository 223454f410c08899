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


def edit_whole_model_every_step(model, layer, batch, n_edit_rows, n_iter, lr, margins, mask_ratio, seed, bound):
    """One edit the way EasyEdit's WISE trains it: every step runs the whole model on the
    edit rows and the unrelated rows together, all positions through the LM head."""
    from wise_ext import ops
    from wise_ext.layer import EditingState

    alpha, beta, gamma = margins
    weight = layer.memories[0]
    leaf = weight.detach().requires_grad_(True)
    layer.editing = EditingState(weight=leaf)
    mask = batch["attention_mask"].float()
    try:
        for _ in range(n_iter):
            leaf.grad = None
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            lm = F.cross_entropy(logits[:n_edit_rows, :-1].flatten(0, 1).float(),
                                 batch["labels"][:n_edit_rows, 1:].flatten(), ignore_index=-100)
            scores = (layer.editing.distances * mask).sum(1) / mask.sum(1)
            s_edit, s_unrel = scores[:n_edit_rows, None], scores[None, n_edit_rows:]
            margin = (F.relu(s_unrel - alpha) + F.relu(beta - s_edit) + F.relu(gamma - (s_edit - s_unrel))).mean()
            (lm + margin).backward()
            with torch.no_grad():
                ops.sharded_sgd_step_(weight, leaf.grad, layer.weight, lr, 0.0, mask_ratio, seed, bound)
            torch.stack([lm.detach(), margin.detach()]).tolist()  # the early-stop check's sync
    finally:
        layer.editing = None
