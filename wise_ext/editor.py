"""WiseEditor: lifelong editing of a Hugging Face causal LM with WISE (Wang et al., 2024).

Reads like the paper's Algorithm 1: each edit trains one shard of a side memory
(a random subset of its entries) against the LM loss on the new target plus the
routing margin loss; every save_freq edits a new shard starts; every merge_freq
edits the shards are Ties-merged into one memory (WISE-Merge) or frozen as a new
memory picked by routing (WISE-Retrieve).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from . import ops
from .config import MERGE_METHODS, WiseConfig
from .layer import EditingState, WiseLayer, bind_attention_mask
from .lower_blocks import frozen_lower_blocks
from .requests import EditRequest, context_limit, encode_answers, lm_loss, token_accuracy
from .surgery import block_index_of, default_layer, get_module, model_activation, set_module

RequestLike = Union[EditRequest, dict]


@dataclass
class EditorState:
    """Bookkeeping of the memories; saved with every checkpoint."""
    n_edits: int = 0
    n_shards: int = 0                                  # shards started so far (their seeds derive from it)
    merged: Optional[int] = None                       # merge mode: index of the merged memory
    shards: list = field(default_factory=list)         # memory indices of the shards since the last merge
    shard_seeds: dict = field(default_factory=dict)    # memory index (str) -> seed
    retrieved: list = field(default_factory=list)      # retrieve mode: frozen memories
    min_scores: list = field(default_factory=list)     # per memory: smallest routing score of its edits
    replay_prompts: list = field(default_factory=list) # retrieve + replay: prompts of frozen memories' edits
    context_prefixes: Optional[list] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EditorState":
        return cls(**d)


@dataclass
class EditResult:
    steps: int
    loss: float
    score: float  # routing score of the edited prompts after the edit


class WiseEditor:
    def __init__(self, model: nn.Module, tokenizer, config: Optional[WiseConfig] = None):
        self.model = model
        self.tokenizer = tokenizer
        config = config or WiseConfig()
        self.layer_name = config.layer or default_layer(model)
        self.config = dataclasses.replace(config, layer=self.layer_name)
        module = get_module(model, self.layer_name)
        if isinstance(module, WiseLayer):
            raise ValueError(f"{self.layer_name} already carries a WiseLayer: detach it or use from_pretrained")
        self.block_index = block_index_of(model, self.layer_name)
        act = model_activation(model) if self.config.routing_act == "model" else self.config.routing_act
        self.layer = WiseLayer(module, routing_act=act, token_reduce=self.config.token_reduce,
                               sticky_routing=self.config.sticky_routing)
        set_module(model, self.layer_name, self.layer)
        self._hooks = bind_attention_mask(model, self.layer)
        self.state = EditorState()
        self.max_length = context_limit(model)

    # ---- public API ----
    def edit(self, request: RequestLike) -> EditResult:
        """Applies one edit (lifelong: on top of all earlier ones)."""
        req = request if isinstance(request, EditRequest) else EditRequest.from_dict(request)
        batch, n_edit_rows = self._edit_batch(req)  # validates before anything changes
        if self.state.n_edits % self.config.save_freq == 0:
            self._start_shard()
        index = self.state.shards[-1]
        result = self._train(index, batch, n_edit_rows)
        self._record_score(index, result.score)
        self.state.n_edits += 1
        if self.config.retrieve and self.config.replay:
            self.state.replay_prompts.append(req.prompt)
        if self.state.n_edits % self.config.merge_freq == 0:
            self._merge()
        return result

    def edit_many(self, requests: Iterable[RequestLike], progress: bool = False) -> list[EditResult]:
        requests = list(requests)
        if progress:
            from tqdm import tqdm

            requests = tqdm(requests, desc="editing", unit="edit")
        return [self.edit(r) for r in requests]

    @torch.no_grad()
    def evaluate(self, requests: Sequence[RequestLike], batch_size: int = 16) -> dict:
        """Rel, Gen and Loc as WISE and EasyEdit define them: teacher-forced token
        accuracy on the new target for the prompt (Rel) and its rephrase (Gen), and
        for Loc the share of the unrelated prompt's answer tokens whose argmax
        prediction is the same after editing as before."""
        reqs = [r if isinstance(r, EditRequest) else EditRequest.from_dict(r) for r in requests]
        self.model.eval()
        rel = self._accuracy([r.prompt for r in reqs], [r.target_new for r in reqs], batch_size)
        with_gen = [r for r in reqs if r.rephrase]
        gen = self._accuracy([r.rephrase for r in with_gen], [r.target_new for r in with_gen], batch_size)
        with_loc = [r for r in reqs if r.loc_prompt]
        loc = self._locality(with_loc, batch_size)

        def mean(x):
            return float(sum(x) / len(x)) if x else float("nan")

        return {"rel": mean(rel), "gen": mean(gen), "loc": mean(loc), "n": len(reqs),
                "per_request": {"rel": rel, "gen": gen, "loc": loc}}

    def save_pretrained(self, path: str) -> None:
        from .checkpoint import save_checkpoint

        save_checkpoint(path, self)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str, tokenizer=None) -> "WiseEditor":
        from .checkpoint import load_checkpoint

        return load_checkpoint(cls, model, path, tokenizer)

    def detach(self) -> nn.Module:
        """Removes the WiseLayer: the model is the base model again, bit for bit."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        set_module(self.model, self.layer_name, self.layer.base_layer)
        return self.model

    # ---- shards, scores, merges ----
    def _shard_seed(self, shard: int) -> int:
        digest = hashlib.sha256(f"wise-ext:{self.config.seed}:{shard}".encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1

    def _shard_origin(self) -> torch.Tensor:
        s = self.state
        if not self.config.retrieve and s.merged is not None:
            return self.layer.memories[s.merged]
        return self.layer.weight

    def _start_shard(self) -> None:
        s = self.state
        index = self.layer.add_memory(self._shard_origin())
        s.shards.append(index)
        s.shard_seeds[str(index)] = self._shard_seed(s.n_shards)
        s.min_scores.append(math.inf)
        s.n_shards += 1

    def _record_score(self, index: int, score: float) -> None:
        s = self.state
        s.min_scores[index] = min(s.min_scores[index], score)
        self.layer.set_threshold(index, self.config.act_ratio * s.min_scores[index])

    def _merge(self) -> None:
        s, cfg = self.state, self.config
        shards = list(s.shards)
        if not shards:
            return
        sparsify, consensus = MERGE_METHODS[cfg.merge_alg]
        weights = cfg.merge_weights or [1.0] * len(shards)
        if len(weights) != len(shards):
            raise ValueError(f"WiseConfig.merge_weights has {len(weights)} entries, expected one per shard "
                             f"({len(shards)} = merge_freq / save_freq)")
        base = self._shard_origin()
        merged = ops.ties_merge(base, [self.layer.memories[i] for i in shards], weights, cfg.density, sparsify,
                                consensus, True, self._shard_seed(s.n_shards))
        min_score = min(s.min_scores[i] for i in shards)
        if not cfg.retrieve and s.merged is not None:
            target = s.merged
            min_score = min(min_score, s.min_scores[target])
            self.layer.memories[target] = merged
        else:
            target = self.layer.add_memory(merged)
            s.min_scores.append(math.inf)
            if cfg.retrieve:
                s.retrieved.append(target)
            else:
                s.merged = target
        s.min_scores[target] = min_score
        self.layer.set_threshold(target, cfg.act_ratio * min_score)
        self._drop_memories(shards)
        s.shards = []

    def _drop_memories(self, indices: Sequence[int]) -> None:
        s = self.state
        self.layer.remove_memories(indices)
        remap = {old: new for new, old in enumerate(m for m in range(len(s.min_scores)) if m not in set(indices))}
        s.min_scores = [s.min_scores[old] for old in sorted(remap)]
        s.shard_seeds = {str(remap[int(k)]): v for k, v in s.shard_seeds.items() if int(k) in remap}
        s.retrieved = [remap[i] for i in s.retrieved]
        s.shards = [remap[i] for i in s.shards if i in remap]
        if s.merged is not None:
            s.merged = remap[s.merged]

    # ---- one edit ----
    def _context_prefixes(self) -> list[str]:
        """Short texts generated once by the model and put before each edit prompt,
        so the edit holds in context (the paper's and EasyEdit's practice)."""
        s = self.state
        if s.context_prefixes is None:
            s.context_prefixes = []
            start = self.tokenizer.bos_token_id
            if start is None:
                start = self.tokenizer.eos_token_id
            if start is not None and self.config.n_context_prefixes > 0:
                with torch.random.fork_rng(devices=[]), self.layer.disabled():
                    torch.manual_seed(self.config.seed)
                    ids = torch.full((self.config.n_context_prefixes, 1), start, dtype=torch.long,
                                     device=self.layer.weight.device)
                    out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                              max_new_tokens=5, min_new_tokens=5, top_k=20,
                                              pad_token_id=start)
                s.context_prefixes = [self.tokenizer.decode(row[1:], skip_special_tokens=True).strip() + ". "
                                      for row in out]
        return s.context_prefixes

    def _edit_batch(self, req: EditRequest):
        prompts = [req.prompt] + [p + req.prompt for p in self._context_prefixes()]
        unrelated = [req.loc_prompt or self.config.unrelated_prompt]
        if self.config.retrieve and self.config.replay:
            # Earlier edits, now in frozen memories, must not fire this new memory.
            unrelated += self.state.replay_prompts[-2:]
        batch = encode_answers(self.tokenizer, prompts + unrelated, [req.target_new] * len(prompts)
                               + [None] * len(unrelated), self.layer.weight.device, self.max_length)
        return batch, len(prompts)

    def _sequence_scores(self, distances: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.to(distances.dtype)
        return (distances * mask).sum(1) / mask.sum(1).clamp(min=1)

    def _train(self, index: int, batch: dict, n_edit_rows: int) -> EditResult:
        cfg, layer = self.config, self.layer
        alpha, beta, gamma = cfg.act_margin
        seed = self.state.shard_seeds[str(index)]
        origin = self._shard_origin()
        weight = layer.memories[index]
        was_training = self.model.training
        self.model.eval()
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        loss_value, steps = float("nan"), 0
        try:
            with frozen_lower_blocks(self.model, self.block_index, batch):
                leaf = weight.detach().requires_grad_(True)
                layer.editing = EditingState(weight=leaf)
                for steps in range(1, cfg.n_iter + 1):
                    leaf.grad = None
                    logits = self.model(**inputs).logits
                    lm = lm_loss(logits[:n_edit_rows], batch["labels"][:n_edit_rows])
                    scores = self._sequence_scores(layer.editing.distances, batch["attention_mask"])
                    s_edit, s_unrel = scores[:n_edit_rows, None], scores[None, n_edit_rows:]
                    margin = (torch.relu(s_unrel - alpha) + torch.relu(beta - s_edit)
                              + torch.relu(gamma - (s_edit - s_unrel))).mean()
                    loss = lm + margin
                    loss.backward()
                    with torch.no_grad():
                        ops.sharded_sgd_step_(weight, leaf.grad, origin, cfg.edit_lr, cfg.weight_decay,
                                              cfg.mask_ratio, seed, cfg.norm_constraint)
                    lm_v, margin_v = torch.stack([lm.detach(), margin.detach()]).tolist()  # the one sync per step
                    loss_value = lm_v + margin_v
                    if lm_v < cfg.early_stop_loss and margin_v == 0.0:
                        break
                # The threshold comes from the scores the finished memory gives the edit.
                with torch.no_grad():
                    layer.editing = EditingState(weight=weight)
                    self.model(**inputs)
                    score = self._sequence_scores(layer.editing.distances, batch["attention_mask"])[:n_edit_rows]
                    score = float(score.min())
        finally:
            layer.editing = None
            self.model.train(was_training)
        return EditResult(steps=steps, loss=loss_value, score=score)

    # ---- evaluation helpers ----
    def _batches(self, n: int, size: int):
        for i in range(0, n, size):
            yield slice(i, min(n, i + size))

    def _accuracy(self, prompts: list[str], answers: list[str], batch_size: int) -> list[float]:
        out = []
        for sl in self._batches(len(prompts), batch_size):
            batch = encode_answers(self.tokenizer, prompts[sl], answers[sl], self.layer.weight.device, self.max_length)
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            out += token_accuracy(logits, batch["labels"]).tolist()
        return out

    def _locality(self, reqs: list[EditRequest], batch_size: int) -> list[float]:
        out = []
        for sl in self._batches(len(reqs), batch_size):
            batch = encode_locality(self.tokenizer, reqs[sl], self.layer.weight.device, self.max_length)
            args = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            after = self.model(**args).logits.argmax(-1)
            with self.layer.disabled():
                before = self.model(**args).logits.argmax(-1)
            mask = batch["labels"][:, 1:] != -100
            same = ((after[:, :-1] == before[:, :-1]) & mask).sum(1).float() / mask.sum(1).clamp(min=1).float()
            out += same.tolist()
        return out


def encode_locality(tokenizer, reqs: Sequence[EditRequest], device, max_length):
    """Locality rows: with an answer, the predictions of its tokens are compared;
    without one, the predictions at every prompt position."""
    batch = encode_answers(tokenizer, [r.loc_prompt for r in reqs], [r.loc_answer for r in reqs], device, max_length)
    for i, r in enumerate(reqs):
        if r.loc_answer is None:
            batch["labels"][i] = torch.where(batch["attention_mask"][i] > 0, 0, -100)  # 0: any non-ignored id
    return batch
