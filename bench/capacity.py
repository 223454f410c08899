"""The ceiling of the fact-LM testbed: its edited layer fitted to all T edits at once.

bench/lifelong.py edits one request at a time, under the routing margins and a
least-change step. This fits the same layer's weight (every entry, no shards) to
the first T ZsRE edits jointly, with Adam on the answer loss alone and no routing
(so no locality to keep): Rel and Gen as the lifelong benchmark measures them, at
the end of each tenth of the epochs. It says how much of a lifelong result's gap
is the layer's capacity and how much is the protocol, and what Gen the testbed
allows at all when only the edit prompts are trained.

    python bench/capacity.py                  # T = 100 and 1000, 60 epochs
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

import factlm
from lifelong import HERE, commit, write_rows
from wise_ext.requests import encode_answers
from wise_ext.surgery import default_layer, get_module

RESULTS = HERE / "results" / "capacity-factlm.json"


def fit(T: int, epochs: int, relative_lr: float, batch_size: int, records: list[dict], log=print) -> dict:
    model, tokenizer, _ = factlm.load_or_train(log=lambda *_: None)
    model.requires_grad_(False)
    layer = default_layer(model)
    weight = get_module(model, layer).weight
    start = weight.detach().clone()
    weight.requires_grad_(True)
    # The step scales with the weight, as the editor's calibrated learning rate does.
    opt = torch.optim.Adam([weight], lr=relative_lr * float(start.pow(2).mean().sqrt()))
    edits = [(r["src"], r["alt"]) for r in records[:T]]
    paraphrases = [(r["rephrase"], r["alt"]) for r in records[:T]]
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    curve = []
    for epoch in range(1, epochs + 1):
        order = torch.randperm(T, generator=g).tolist()
        for i in range(0, T, batch_size):
            chunk = [edits[j] for j in order[i:i + batch_size]]
            batch = encode_answers(tokenizer, [p for p, _ in chunk], [a for _, a in chunk], "cpu")
            loss = factlm.answer_loss(model, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % max(1, epochs // 10) == 0 or epoch == epochs:
            point = {"epoch": epoch, "rel": round(factlm.accuracy(model, tokenizer, edits), 4),
                     "gen": round(factlm.accuracy(model, tokenizer, paraphrases), 4),
                     "weight_change": round(float((weight.detach() - start).norm() / start.norm()), 2)}
            curve.append(point)
            log(T, point, f"{time.perf_counter() - t0:.0f}s")
    return {"testbed": "factlm", "layer": layer, "T": T, "epochs": epochs, "relative_lr": relative_lr,
            "batch_size": batch_size, "rel": curve[-1]["rel"], "gen": curve[-1]["gen"],
            "best_rel": max(p["rel"] for p in curve), "weight_change": curve[-1]["weight_change"],
            "curve": curve, "seconds": round(time.perf_counter() - t0, 1), "commit": commit()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--relative-lr", type=float, default=1.0, help="Adam's step in units of the weight's RMS")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    records = factlm.zsre_records()
    rows = [fit(T, args.epochs, args.relative_lr, args.batch_size, records) for T in args.T]
    write_rows(rows, args.out)


if __name__ == "__main__":
    main()
