"""WiseEditor: lifelong editing of a Hugging Face causal LM with WISE (Wang et al., 2024).

Reads like the paper's Algorithm 1: each edit trains one shard of a side memory
(a random subset of its entries) against the LM loss on the new target plus the
routing margin loss; every save_freq edits a new shard starts; every merge_freq
edits the shards are Ties-merged into one memory (WISE-Merge) or frozen as a new
memory picked by routing (WISE-Retrieve).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .config import MERGE_METHODS, WiseConfig
from .layer import WiseLayer, bind_attention_mask, routing_mask
from .preconditioner import ridge_preconditioner, second_moment, shard_features, step_direction
from .edit_session import EditSession, answer_logits, layer_inputs
from .requests import EditRequest, context_limit, encode_answers, token_accuracy
from .surgery import block_index_of, default_layer, get_module, model_activation, set_module
from .margin import KeptTexts, kept_margin
from .token_rows import TokenRows

RequestLike = Union[EditRequest, dict]


@dataclass
class EditorState:
    """Bookkeeping of the memories and the routing calibration; saved with every checkpoint."""
    n_edits: int = 0
    n_shards: int = 0                                  # shards started so far (their seeds derive from it)
    merged: Optional[int] = None                       # merge mode: index of the merged memory
    shards: list = field(default_factory=list)         # memory indices of the shards since the last merge
    shard_seeds: dict = field(default_factory=dict)    # memory index (str) -> seed
    retrieved: list = field(default_factory=list)      # retrieve mode: frozen memories
    min_scores: list = field(default_factory=list)     # per memory: smallest routing score of its edits
    memory_edits: list = field(default_factory=list)   # per memory: its edits' [prompt, target]
    reference_prompts: Optional[list] = None           # unrelated texts: margin loss and locality guard
    context_prefixes: Optional[list] = None
    routing_scale: Optional[float] = None              # mean main-memory output norm on the reference prompts
    margins: Optional[list] = None                     # (alpha, beta, gamma) in use, absolute
    edit_lr: Optional[float] = None                    # calibrated SGD learning rate
    logit_spread: Optional[float] = None               # mean std over the vocabulary of the reference logits

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EditorState":
        return cls(**d)


@dataclass
class EditResult:
    steps: int
    loss: float
    score: float      # smallest routing score of the edited prompts after the edit
    threshold: float  # the memory's routing threshold after the edit


class WiseEditor:
    """Lifelong WISE editing of ``model`` (a Hugging Face causal LM).

    ``reference_prompts``: texts unrelated to the edits (e.g. a training split's
    locality questions, as EasyEdit uses). Every step of every edit keeps their
    routing scores under the margin alpha, and every threshold above them. By
    default they are sampled from the model itself, once.
    """

    def __init__(self, model: nn.Module, tokenizer, config: Optional[WiseConfig] = None,
                 reference_prompts: Optional[Sequence[str]] = None):
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
        # Merge mode: the newest memory that fires holds the edit (each open shard holds
        # the earlier ones' changes and the merged memory's). Retrieve: the highest score,
        # the paper's rule; with replay each memory was trained to lose to the frozen
        # memories on their edits and to beat them on its own (KeptTexts).
        select = "score" if self.config.retrieve else "latest"
        self.layer = WiseLayer(module, routing_act=act, token_reduce=self.config.token_reduce,
                               sticky_routing=self.config.sticky_routing, select=select)
        set_module(model, self.layer_name, self.layer)
        self._hooks = bind_attention_mask(model, self.layer)
        self.state = EditorState()
        if reference_prompts is not None:
            prompts = [p for p in reference_prompts if isinstance(p, str) and p.strip()]
            if not prompts:
                raise ValueError("reference_prompts is empty")
            self.state.reference_prompts = prompts
        self.max_length = context_limit(model)
        self._reference: Optional[dict] = None  # see _reference_rows (not saved: recomputed)
        self._additive: Optional[bool] = None        # see EditSession
        self._main_rms: Optional[float] = None
        self._samples: Optional[list[str]] = None
        # Memory index -> (edits counted, sum of their inputs' token-averaged second moments);
        # derived from state.memory_edits, so saved only with save_pretrained(training_state=True).
        self._moments: dict[int, tuple[int, Tensor]] = {}
        self._reference_moment: Optional[Tensor] = None  # per token, of the "train" references
        # (the frozen memories, their replayed edits, the highest of those memories' scores on each)
        self._replay: Optional[tuple[list, TokenRows, Tensor]] = None

    # ---- public API ----
    def edit(self, request: RequestLike) -> EditResult:
        """Applies one edit (lifelong: on top of all earlier ones)."""
        req = request if isinstance(request, EditRequest) else EditRequest.from_dict(request)
        batch = self._edit_batch(req, self._rehearsed_edits())  # validates before anything changes
        self._calibrate()
        if self.state.n_edits % self.config.save_freq == 0:
            self._start_shard()  # a new shard holds no edits yet: the rehearsed ones stay those of its memory
        index = self.state.shards[-1]
        result = self._train(index, batch)
        self.state.memory_edits[index].append([req.prompt, req.target_new])
        self.state.n_edits += 1
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

    def save_pretrained(self, path: str, training_state: bool = False) -> None:
        """The memories, thresholds, config and state, as safetensors + JSON. ``training_state``
        adds what editing goes on from (each memory's moment of its edits' inputs, summed edit by edit), so that
        ``from_pretrained(...).edit_many(rest)`` equals the unbroken run bit for bit."""
        from .checkpoint import save_checkpoint

        save_checkpoint(path, self, training_state)

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

    # ---- routing calibration ----
    def _calibrate(self) -> None:
        """Sizes the margins to this layer, once: the routing scale is the mean norm of
        the main memory's (activated) output on the reference prompts; and with
        answer_margin, measures the model's logit spread."""
        s, cfg = self.state, self.config
        if s.margins is None:
            s.routing_scale, s.margins = self._routing_margins()
        if cfg.answer_margin is not None and s.logit_spread is None:
            s.logit_spread = self._logit_spread()

    def _routing_margins(self) -> tuple[float, list]:
        cfg = self.config
        ref = self._reference_rows()
        scale = float(ref.mean(ops.routing_distance(torch.zeros_like(ref.y_main), ref.y_main,
                                                    self.layer.routing_act)).mean())
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"{self.layer_name}: the main memory's output on the reference prompts has norm "
                             f"{scale}; cannot calibrate routing")
        if cfg.act_margin is None:
            return scale, [r * scale for r in cfg.relative_margin]
        margins = list(cfg.act_margin)
        ratio = margins[1] / (cfg.relative_margin[1] * scale)
        if not 0.1 <= ratio <= 10:
            warnings.warn(f"WiseConfig.act_margin {tuple(margins)} is {ratio:.3g}x the scale of "
                          f"{self.layer_name}'s routing scores (beta {cfg.relative_margin[1]} x {scale:.4g}); "
                          f"leave act_margin unset to calibrate it", stacklevel=4)
        return scale, margins

    def _answer_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy over the answer tokens, of those that do not yet lead every other
        token by WiseConfig.answer_margin x the model's logit spread. A head that cannot
        express confidence (random, undertrained) never brings an answer near
        early_stop_loss: its cross-entropy would pull the memory's weights for every step."""
        ce = F.cross_entropy(logits, targets, reduction="none")
        if self.config.answer_margin is None:
            return ce.mean()
        with torch.no_grad():
            top = logits.topk(2, dim=1)
            rival = torch.where(top.indices[:, 0] == targets, top.values[:, 1], top.values[:, 0])
            lead = logits.gather(1, targets[:, None])[:, 0] - rival
            learning = lead < self.config.answer_margin * self.state.logit_spread
        return (ce * learning).sum() / ce.numel()

    @torch.no_grad()
    def _logit_spread(self) -> float:
        """The unedited model's logit spread: the std over the vocabulary of its logits on
        the reference prompts, averaged over their tokens."""
        prompts = self.state.reference_prompts
        spreads = []
        with self.layer.disabled():
            for sl in self._batches(len(prompts), 32):
                batch = encode_answers(self.tokenizer, prompts[sl], [None] * len(prompts[sl]),
                                       self.layer.weight.device, self.max_length)
                out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                spreads.append(out[batch["attention_mask"].bool()].float().std(-1))
        return float(torch.cat(spreads).mean())

    def _learning_rate(self, grad: torch.Tensor) -> float:
        """WiseConfig.edit_lr (absolute, EasyEdit's), or one calibrated on the first
        edit's first gradient (kept in the state), so that step moves the trained
        entries by relative_lr x the main weight's RMS."""
        s, cfg = self.state, self.config
        if cfg.edit_lr is not None:
            return cfg.edit_lr
        if s.edit_lr is None:
            g = float(grad.detach().float().pow(2).mean().sqrt())
            if not math.isfinite(g) or g == 0:
                raise ValueError(f"{self.layer_name}: the first edit's gradient is {g}; cannot calibrate edit_lr")
            s.edit_lr = cfg.relative_lr * self._weight_rms() / g
        return s.edit_lr

    def _norm_constraint(self) -> float:
        """WiseConfig.norm_constraint (absolute, EasyEdit's), or relative_norm_constraint x
        the main weight's RMS: a bound on how far one entry may move, whatever the scale."""
        cfg = self.config
        if cfg.norm_constraint is not None:
            return cfg.norm_constraint
        if cfg.relative_norm_constraint is None:
            return math.inf
        return cfg.relative_norm_constraint * self._weight_rms()

    def _weight_rms(self) -> float:
        if self._main_rms is None:
            self._main_rms = float(self.layer.weight.detach().float().pow(2).mean().sqrt())
        return self._main_rms

    def _reference_rows(self, part: str = "train") -> TokenRows:
        """The reference prompts' layer inputs, in parts: "train" (every other prompt) shapes
        the steps (margin loss, preconditioner); "margin" is those and after them their
        joined runs (late positions), which the margin keeps under alpha; "guard" (the
        rest) sets the locality guard, so the guard is measured on prompts the memory was
        not fitted to."""
        if self._reference is None:
            s = self.state
            if s.reference_prompts is None:
                s.reference_prompts = [self.config.unrelated_prompt] + self._sampled_texts()
            prompts = s.reference_prompts
            train, guard = prompts[0::2], prompts[1::2] or prompts[0::2]
            rows, joined = self._rows(train, None), self._joined(train)
            # Joined once here: every edit's margin reads them.
            margin = TokenRows.cat([rows, self._rows(joined, None)]) if joined else rows
            self._reference = {"train": rows, "margin": margin, "guard": self._rows(guard, None)}
        return self._reference[part]

    def _joined(self, texts: Sequence[str]) -> list[str]:
        """Each run of WiseConfig.reference_join consecutive texts as one, where it fits the
        model's context: the late positions that long unrelated texts reach."""
        k = self.config.reference_join
        joined = [" ".join(texts[i:i + k]) for i in range(len(texts) - k + 1)] if k > 1 else []
        if self.max_length is None:
            return joined
        return [t for t in joined if len(self.tokenizer(t)["input_ids"]) <= self.max_length]

    def _rows(self, prompts: Sequence[str], answers: Optional[Sequence[Optional[str]]], batch_size: int = 64):
        parts = []
        for sl in self._batches(len(prompts), batch_size):
            batch = encode_answers(self.tokenizer, prompts[sl], answers[sl] if answers else [None] * len(prompts[sl]),
                                   self.layer.weight.device, self.max_length)
            a, y = layer_inputs(self.model, self.layer, batch["input_ids"], batch["attention_mask"])
            parts.append(TokenRows.from_batch(a, y, self._routing_mask(batch)))
        return TokenRows.cat(parts)

    def _routing_mask(self, batch: dict) -> torch.Tensor:
        return routing_mask(batch["attention_mask"], batch["input_ids"], getattr(self.model.config, "bos_token_id", None))

    def _scores(self, rows: TokenRows, weight: torch.Tensor, reduce: Optional[str] = None) -> torch.Tensor:
        """Routing scores of ``rows`` against one side memory: differentiable mean per row
        while training, else reduced as inference reduces them."""
        d = rows.distances(self.layer.linear(rows.a, weight), self.layer.routing_act)
        return rows.mean(d) if reduce is None else rows.reduce(d, reduce)

    def _set_threshold(self, index: int, edit_scores: Optional[torch.Tensor] = None) -> float:
        """Between the memory's edits and the unrelated prompts (WiseConfig.threshold_from).
        The guard is 1/act_ratio above the held-out references' guard_quantile score; the
        edge act_ratio below the memory's weakest edit. "references": the geometric
        midpoint of the two where the edge is higher (as far from what must stay off as from
        what must fire), else the guard; "edits": the edge, never under the guard. An
        unrelated prompt leaves the main memory when any side memory fires, so with k
        memories routing each one's guard lets through a k-th of the 1 - guard_quantile share."""
        s, cfg = self.state, self.config
        if edit_scores is not None:
            s.min_scores[index] = min(s.min_scores[index], float(edit_scores.min()))
        guard = self._guard(index)
        edge = cfg.act_ratio * s.min_scores[index]
        if cfg.threshold_from == "edits":
            threshold = max(edge, guard)
        else:
            threshold = math.sqrt(guard * edge) if guard < edge < math.inf else guard
        self.layer.set_threshold(index, threshold)
        return threshold

    @torch.no_grad()
    def _guard(self, index: int) -> float:
        """The least threshold of memory ``index``: 1/act_ratio above the held-out references' scores."""
        cfg = self.config
        held_out = self._scores(self._reference_rows("guard"), self.layer.memories[index], self.layer.token_reduce)
        level = 1 - (1 - cfg.guard_quantile) / self._routing_memories()
        return float(torch.quantile(held_out.float(), level)) / cfg.act_ratio

    def _routing_memories(self) -> int:
        """The side memories that inference routes among: the merged or frozen ones and the open shards."""
        s = self.state
        frozen = len(s.retrieved) if self.config.retrieve else int(s.merged is not None)
        return max(1, frozen + len(s.shards))

    # ---- shards, merges ----
    def _seed(self, *key) -> int:
        """A seed per key: a shard's mask and a merge take the shard count, a rehearsal draw the edit count."""
        digest = hashlib.sha256(":".join(map(str, ("wise-ext", self.config.seed, *key))).encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1

    def _shard_origin(self) -> torch.Tensor:
        s = self.state
        if not self.config.retrieve and s.merged is not None:
            return self.layer.memories[s.merged]
        return self.layer.weight

    def _new_memory(self, init: torch.Tensor, edits: list) -> int:
        index = self.layer.add_memory(init)
        self.state.min_scores.append(math.inf)
        self.state.memory_edits.append(edits)
        return index

    def _start_shard(self) -> None:
        """A new shard starts from the newest open one: the merge adds the open shards'
        changes together, so each edit trains with the earlier shards' changes in place
        (the shards before it cannot overwrite its answers there), and between merges
        the newest shard holds every change since the last merge, as the merge will."""
        s = self.state
        start = self.layer.memories[s.shards[-1]] if s.shards else self._shard_origin()
        index = self._new_memory(start, [])
        s.shards.append(index)
        s.shard_seeds[str(index)] = self._seed(s.n_shards)
        s.n_shards += 1

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
        base = self._shard_origin().detach()  # the main weight is a parameter: keep it out of any graph
        # Each shard started from the one before it: Ties sees what each one added.
        starts = [base] + [self.layer.memories[i] for i in shards[:-1]]
        increments = [base + (self.layer.memories[i] - start) for i, start in zip(shards, starts)]
        merged = ops.ties_merge(base, increments, weights, cfg.density, sparsify, consensus, cfg.merge_normalize,
                                self._seed(s.n_shards))
        edits = [e for i in shards for e in s.memory_edits[i]]
        if not cfg.retrieve and s.merged is not None:
            target = s.merged
            self.layer.memories[target] = merged
            s.memory_edits[target] = s.memory_edits[target] + edits
            self._moments.pop(target, None)
        else:
            target = self._new_memory(merged, edits)
            if cfg.retrieve:
                s.retrieved.append(target)
            else:
                s.merged = target
        self._drop_memories(shards)
        s.shards = []
        target = s.retrieved[-1] if cfg.retrieve else s.merged
        self._consolidate(target, s.retrieved[:-1] if cfg.retrieve else [])
        # The merged memory answers differently from every shard: its threshold is
        # measured on it, from all the edits it holds, not inherited.
        s.min_scores[target] = math.inf
        prompts, targets = zip(*s.memory_edits[target])
        with torch.no_grad():
            scores = self._scores(self._rows(list(prompts), list(targets)), self.layer.memories[target],
                                  self.layer.token_reduce)
        self._set_threshold(target, scores)
        for index in s.retrieved[:-1]:  # one more memory routes: the earlier ones' guards tighten
            self._set_threshold(index)

    def _consolidate(self, index: int, frozen: list) -> None:
        """Trains memory ``index`` on all the edits it holds (WiseConfig.consolidate_epochs
        passes, shuffled, in batches of consolidate_batch, consolidate_steps steps each: many
        short passes fit them jointly, where a batch trained to the end undid the ones before
        it), then up to consolidate_repair_passes over the edits still unsettled, under the
        margin of an edit, replaying the edits of the ``frozen`` memories before it: a merge
        keeps only part of each shard's change, and each edit nudged the answers of those
        before it."""
        cfg, s = self.config, self.state
        edits = s.memory_edits[index]
        if not (cfg.consolidate_epochs or cfg.consolidate_repair_passes) or not edits:
            return
        # Every entry trains, each bounded (norm_constraint) around where the merge left it.
        origin = self.layer.memories[index].clone()
        kept = self._kept_texts(frozen)
        # The memory's own edits weigh in the step as in merge mode, where the merged memory is held (retrieve
        # without them, fact-LM T = 1000's first merge: Rel 0.935 against 0.951, Loc 0.977 against 0.982). They stay
        # the same throughout: one inverse.
        precond = self._preconditioner(None, [index])
        g = torch.Generator().manual_seed(self._seed("consolidate", s.n_edits))
        for n in range(cfg.consolidate_epochs + cfg.consolidate_repair_passes):
            least = self._consolidate_floor(index)
            picked = range(len(edits)) if n < cfg.consolidate_epochs else self._unsettled(index, least)
            if not picked:
                break
            order = [picked[j] for j in torch.randperm(len(picked), generator=g).tolist()]
            for i in range(0, len(order), cfg.consolidate_batch):
                chunk = [edits[j] for j in order[i:i + cfg.consolidate_batch]]
                self._fit(index, self._edit_batch(None, chunk), None, precond, 1.0, 0, origin, kept,
                          cfg.consolidate_steps, least)

    @torch.no_grad()
    def _unsettled(self, index: int, least: float, batch_size: int = 32) -> list[int]:
        """The edits of memory ``index`` that it does not answer (every answer token, teacher-forced,
        the memory forced) or that score under ``least``. The head runs on the answer positions only."""
        edits, memory, out = self.state.memory_edits[index], self.layer.memories[index], []
        for sl in self._batches(len(edits), batch_size):
            prompts, answers = zip(*edits[sl])
            batch = encode_answers(self.tokenizer, list(prompts), list(answers), memory.device, self.max_length)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            with self._eval_mode(), EditSession(self.model, self.layer, self.block_index, inputs, memory,
                                                self._additive) as session:
                self._additive = session.additive
                logits, targets = answer_logits(self.model, session.hidden(), batch["labels"])
                rows = TokenRows.from_batch(session.layer_input, self.layer.editing.y_main, self._routing_mask(batch))
                scores = self._scores(rows, memory, self.layer.token_reduce)
            row_of = (batch["labels"][:, 1:] != -100).nonzero()[:, 0]
            missed = scores.new_zeros(len(scores), dtype=torch.long).index_add_(
                0, row_of, (logits.argmax(-1) != targets).long())
            out += [sl.start + i for i in torch.nonzero((missed > 0) | (scores < least)).flatten().tolist()]
        return out

    def _consolidate_floor(self, index: int) -> float:
        """The score every edit of a consolidating memory must reach: 1/act_ratio above its guard, where
        the threshold then sits under the weakest edit. After hundreds of edits a memory sits far from the
        main one on every prompt, and its guard far above beta."""
        return max(self.state.margins[1], self._guard(index) / self.config.act_ratio)

    def _drop_memories(self, indices: Sequence[int]) -> None:
        s = self.state
        self.layer.remove_memories(indices)
        kept = [m for m in range(len(s.min_scores)) if m not in set(indices)]
        remap = {old: new for new, old in enumerate(kept)}
        s.min_scores = [s.min_scores[old] for old in kept]
        self._moments = {remap[i]: m for i, m in self._moments.items() if i in remap}
        s.memory_edits = [s.memory_edits[old] for old in kept]
        s.shard_seeds = {str(remap[int(k)]): v for k, v in s.shard_seeds.items() if int(k) in remap}
        s.retrieved = [remap[i] for i in s.retrieved]
        s.shards = [remap[i] for i in s.shards if i in remap]
        if s.merged is not None:
            s.merged = remap[s.merged]

    # ---- one edit ----
    def _sampled_texts(self) -> list[str]:
        """Short texts sampled once from the unedited model: context prefixes for the
        edit prompts (the paper's and EasyEdit's practice) and unrelated references."""
        if self._samples is None:
            self._samples = self._sample_texts()
        return self._samples

    def _sample_texts(self) -> list[str]:
        start = self.tokenizer.bos_token_id
        if start is None:
            start = self.tokenizer.eos_token_id
        n = max(self.config.n_context_prefixes, self.config.n_reference_samples)
        if start is None or n == 0:
            return []
        with torch.random.fork_rng(devices=[]), self.layer.disabled():
            torch.manual_seed(self.config.seed)
            ids = torch.full((n, 1), start, dtype=torch.long, device=self.layer.weight.device)
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=8,
                                      min_new_tokens=8, top_k=20, pad_token_id=start)
        return [self.tokenizer.decode(row[1:], skip_special_tokens=True).strip() for row in out]

    def _context_prefixes(self) -> list[str]:
        s = self.state
        if s.context_prefixes is None:
            texts = self._sampled_texts()[:self.config.n_context_prefixes]
            s.context_prefixes = [" ".join(t.split()[:5]) + ". " for t in texts if t]
        return s.context_prefixes

    def _edit_batch(self, req: Optional[EditRequest], rehearsed: Sequence[Sequence[str]] = ()) -> dict:
        """The request's prompt and its context-prefixed copies with the target as labels
        (none without a request), then the rehearsed earlier edits, and ``span``: per
        row, the tokens of prompt + target (the prefix is shared with unrelated texts, so
        it is left out of the routing margin)."""
        prompts = [req.prompt] + [p + req.prompt for p in self._context_prefixes()] if req is not None else []
        n_own = len(prompts)
        answers = ([req.target_new] * n_own if n_own else []) + [t for _, t in rehearsed]
        batch = encode_answers(self.tokenizer, prompts + [p for p, _ in rehearsed], answers,
                               self.layer.weight.device, self.max_length)
        span = self._routing_mask(batch).float()
        if n_own:
            lengths = batch["attention_mask"][:n_own].sum(1, keepdim=True)
            pos = torch.arange(span.shape[1], device=span.device)
            span[:n_own] = ((pos < lengths) & (pos >= lengths - span[0].sum())).float()
        batch["span"] = span
        return batch

    def _rehearsed_edits(self) -> list:
        """Up to n_rehearsal earlier edits of the memory this edit trains (merge mode: the
        merged memory's and the open shards'; retrieve: the open shards'), drawn afresh
        for every edit: they train with it, so its steps cannot overwrite their answers.
        (Drawing those the memory answers worst kept no more: fact-LM merge, T = 100.)"""
        s, n = self.state, self.config.n_rehearsal
        held = [e for i in self._held_memories() for e in s.memory_edits[i]]
        if not n or not held:
            return []
        g = torch.Generator().manual_seed(self._seed(s.n_edits))
        return [held[i] for i in torch.randperm(len(held), generator=g)[:n].tolist()]

    def _held_memories(self) -> list[int]:
        """The memories whose edits share the memory the next edit trains."""
        s = self.state
        return list(s.shards) + ([s.merged] if not self.config.retrieve and s.merged is not None else [])

    def _kept_texts(self, frozen: Optional[list] = None) -> KeptTexts:
        """The texts the margin keeps down: the references, under alpha, and in retrieve
        mode with replay the replayed edits of the ``frozen`` memories (None: every frozen
        one), under their memories' scores less gamma. The joined references are
        constraints on top of the texts they join, not more texts: counted in the mean,
        they diluted the pull on the single texts, which an unrelated prompt resembles
        (the demo's Rel 0.88 -> 0.38)."""
        alpha, _, gamma = self.state.margins
        rows, n_texts = self._reference_rows("margin"), self._reference_rows().n_rows
        ceiling = torch.full((rows.n_rows,), alpha, device=rows.a.device)
        led = torch.ones(rows.n_rows, dtype=torch.bool, device=rows.a.device)
        frozen = self.state.retrieved if frozen is None else frozen
        if not (self.config.retrieve and self.config.replay and frozen):
            return KeptTexts(rows, n_texts, ceiling, led)
        replay, held_by = self._replay_rows(frozen)
        return KeptTexts(TokenRows.cat([rows, replay]), n_texts + replay.n_rows,
                         torch.cat([ceiling, torch.clamp(held_by - gamma, min=alpha)]),
                         torch.cat([led, torch.zeros_like(held_by, dtype=torch.bool)]), list(frozen))

    def _replay_rows(self, frozen: list) -> tuple[TokenRows, Tensor]:
        """Replay (paper, B.3): up to n_replay edits spread evenly over the ``frozen``
        memories, and the score that picks a memory for each (the highest of theirs).
        Drawn again only when the frozen memories change."""
        s = self.state
        if self._replay is None or self._replay[0] != list(frozen):
            held = [e for index in frozen for e in s.memory_edits[index]]
            n = min(len(held), self.config.n_replay)
            picked = [held[(2 * i + 1) * len(held) // (2 * n)] for i in range(n)]
            rows = self._rows([p for p, _ in picked], [t for _, t in picked])
            with torch.no_grad():
                held_by = torch.stack([self._scores(rows, self.layer.memories[m], self.layer.token_reduce)
                                       for m in frozen]).amax(0)
            self._replay = (list(frozen), rows, held_by)
        return self._replay[1], self._replay[2]

    def _train(self, index: int, batch: dict) -> EditResult:
        """One edit: its batch trains the shard ``index``, whose threshold then follows."""
        cfg = self.config
        # Entry shards: the op draws the mask; feature shards: the step is already zero off the shard.
        ratio = cfg.mask_ratio if cfg.shard_by == "entry" else 1.0
        features = self._shard_features(index)
        steps, loss, scores = self._fit(index, batch, features, self._preconditioner(features), ratio,
                                        self.state.shard_seeds[str(index)], self._shard_origin(),
                                        self._kept_texts(), cfg.n_iter, self.state.margins[1])
        threshold = self._set_threshold(index, scores)
        return EditResult(steps=steps, loss=loss, score=float(scores.min()), threshold=threshold)

    def _fit(self, index: int, batch: dict, features: Optional[Tensor], precond: Optional[Tensor], ratio: float,
             seed: int, origin: Tensor, kept: KeptTexts, n_iter: int, least: float) -> tuple[int, float, Tensor]:
        """Trains memory ``index`` on ``batch`` (answer loss and routing margin, ``kept`` down) for up
        to ``n_iter`` steps on ``features`` (None: all), preconditioned with ``precond``, the op's entry
        mask drawn with ``ratio`` and ``seed``, each entry bounded around ``origin``, every edit row
        scoring at least ``least`` (an edit: beta). Returns
        the steps, the last loss and the routing score of the batch's first row."""
        cfg, layer, s = self.config, self.layer, self.state
        gamma = s.margins[2]
        weight = layer.memories[index]
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        leaf = weight.detach().requires_grad_(True)
        loss_value, steps = float("nan"), 0
        with self._eval_mode():
            with EditSession(self.model, layer, self.block_index, inputs, leaf, self._additive) as session:
                self._additive = session.additive
                span = batch["span"]
                floor = self._edit_floor(session, span, kept.rivals, least)
                for steps in range(1, n_iter + 1):
                    leaf.grad = None
                    logits, targets = answer_logits(self.model, session.hidden(), batch["labels"])
                    lm = self._answer_loss(logits.float(), targets)
                    s_edit = (session.distances * span).sum(1) / span.sum(1)
                    margin = (torch.relu(floor - s_edit).mean()
                              + kept_margin(kept, lambda rows: self._scores(rows, leaf), s_edit, gamma))
                    (lm + margin).backward()
                    with torch.no_grad():
                        step = self._direction(leaf.grad, weight, features, precond)
                        ops.sharded_sgd_step_(weight, step, origin, self._learning_rate(step), 0.0, ratio, seed,
                                              self._norm_constraint())
                    lm_v, margin_v = torch.stack([lm.detach(), margin.detach()]).tolist()  # the one sync per step
                    loss_value = lm_v + margin_v
                    if lm_v < cfg.early_stop_loss and margin_v == 0.0:
                        break
                with torch.no_grad():
                    # An edit's threshold comes from its own prompt (the first row), as it will be asked.
                    edit_rows = TokenRows.from_batch(session.layer_input[:1], layer.editing.y_main[:1],
                                                     self._routing_mask(batch)[:1])
                    scores = self._scores(edit_rows, weight, layer.token_reduce)
        return steps, loss_value, scores

    @contextlib.contextmanager
    def _eval_mode(self):
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def _edit_floor(self, session: EditSession, span: Tensor, rivals: list, least: float) -> Tensor | float:
        """The score each row of the batch must reach: ``least``, and gamma above the ``rivals``' scores
        on it (retrieve: inference picks the highest score)."""
        gamma = self.state.margins[2]
        if not rivals:
            return least
        rows = TokenRows.from_batch(session.layer_input, self.layer.editing.y_main, span)
        rival = torch.stack([self._scores(rows, self.layer.memories[m]) for m in rivals]).amax(0)
        return torch.clamp(rival + gamma, min=least)

    # ---- step direction ----
    def _features(self) -> int:
        return self.layer.weight.shape[0 if self.layer.transpose else 1]

    def _shard_features(self, index: int) -> Optional[Tensor]:
        """The input features the shard trains; None for entry shards (all features, the op's mask)."""
        if self.config.shard_by == "entry":
            return None
        return shard_features(self._features(), self.config.mask_ratio, self.state.shard_seeds[str(index)],
                              self.layer.weight.device)

    def _direction(self, grad: Tensor, weight: Tensor, features: Optional[Tensor],
                   precond: Optional[Tensor]) -> Tensor:
        """The step the op takes: the preconditioned gradient plus weight decay (not
        preconditioned), on the shard's features only; the op masks entry shards."""
        step = step_direction(grad, features, precond, self.layer.transpose)
        decay = self.config.weight_decay
        if not decay:
            return step
        if features is not None:
            weight = weight * (features.view(-1, 1) if self.layer.transpose else features.view(1, -1))
        return step + decay * weight

    def _preconditioner(self, features: Optional[Tensor], held: Optional[list] = None) -> Optional[Tensor]:
        """The ridge preconditioner of the next steps on ``features`` (None: all), protecting the
        edits of the ``held`` memories (None: those the next edit shares); None without precondition_eps."""
        eps = self.config.precondition_eps
        return None if eps is None else ridge_preconditioner(self._protected_moment(held), features, eps)

    def _protected_moment(self, held: Optional[list] = None) -> Tensor:
        """Second moment of the inputs a step must leave alone: the reference prompts'
        (per token) and, edit by edit, those of the ``held`` memories (None: the edits that
        will share a memory with the next one; merge mode: the merged memory's and every
        open shard's)."""
        s = self.state
        if self._reference_moment is None:
            ref = self._reference_rows()
            self._reference_moment = second_moment(ref.a) / max(1, ref.a.shape[0])
        held = self._held_memories() if held is None else held
        n_edits = sum(len(s.memory_edits[i]) for i in held)
        # The references weigh one token per held edit (and one more), each edit edit_protection tokens.
        moment = self._reference_moment * (1 + n_edits)
        for index in held:
            moment = moment + self.config.edit_protection * self._edit_moment(index)
        return moment

    def _edit_moment(self, index: int) -> Tensor:
        """Sum over the memory's edits of their (prompt + target) inputs' mean second
        moment, kept up to date edit by edit."""
        edits = self.state.memory_edits[index]
        counted, moment = self._moments.get(index, (0, 0.0))
        if counted < len(edits):
            new = edits[counted:]
            rows = self._rows([p for p, _ in new], [t for _, t in new])
            weight = rows.counts().clamp(min=1).float().rsqrt()[rows.row]
            moment = moment + second_moment(rows.a * weight.unsqueeze(1))
        self._moments[index] = (len(edits), moment)
        return moment

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
