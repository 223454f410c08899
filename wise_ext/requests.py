"""Edit requests and their tokenisation into teacher-forced batches."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor


@dataclass
class EditRequest:
    prompt: str
    target_new: str
    rephrase: Optional[str] = None
    loc_prompt: Optional[str] = None
    loc_answer: Optional[str] = None
    subject: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("EditRequest.prompt is empty")
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            raise ValueError(f"EditRequest.target_new is empty (prompt {self.prompt!r})")

    @classmethod
    def from_dict(cls, d: dict) -> "EditRequest":
        """Reads ZsRE records (src, alt, rephrase, loc, loc_ans) and EasyEdit requests
        (prompt, target_new, rephrase_prompt, locality_prompt, locality_ground_truth)."""
        def first(*keys):
            for k in keys:
                if d.get(k) not in (None, ""):
                    return d[k]
            return None

        return cls(
            prompt=first("prompt", "src"),
            target_new=first("target_new", "alt"),
            rephrase=first("rephrase", "rephrase_prompt"),
            loc_prompt=first("loc_prompt", "loc", "locality_prompt"),
            loc_answer=first("loc_answer", "loc_ans", "locality_ground_truth"),
            subject=first("subject"),
        )


def load_requests(path: str, limit: Optional[int] = None) -> list[EditRequest]:
    with open(path) as f:
        records = json.load(f)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of edit records")
    return [EditRequest.from_dict(r) for r in records[:limit]]


def join_answer(prompt: str, answer: str) -> str:
    """The text a model reads for prompt + answer (one space between them)."""
    if answer.startswith(" ") or prompt.endswith(" "):
        return prompt + answer
    return prompt + " " + answer


def context_limit(model) -> Optional[int]:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if value is not None:
            return value
    return 0


def encode_answers(tokenizer, prompts: Sequence[str], answers: Sequence[Optional[str]], device,
                   max_length: Optional[int] = None) -> dict[str, Tensor]:
    """Right-padded batch of prompt + answer with labels on the answer tokens only
    (-100 elsewhere; a row whose answer is None is all -100)."""
    rows, labels = [], []
    for prompt, answer in zip(prompts, answers):
        prompt_ids = tokenizer(prompt)["input_ids"]
        if answer is None:
            ids, lab = prompt_ids, [-100] * len(prompt_ids)
        else:
            ids = tokenizer(join_answer(prompt, answer))["input_ids"]
            n_prompt = len(prompt_ids)
            # Tokenisers may merge across the boundary; the answer starts where the ids first differ.
            while n_prompt > 0 and ids[:n_prompt] != prompt_ids[:n_prompt]:
                n_prompt -= 1
            lab = [-100] * n_prompt + ids[n_prompt:]
            if len(ids) <= n_prompt:
                raise ValueError(f"answer {answer!r} adds no tokens after prompt {prompt!r}")
        if max_length is not None and len(ids) > max_length:
            raise ValueError(f"prompt {prompt!r} with its answer is {len(ids)} tokens, "
                             f"longer than the model's context of {max_length}")
        rows.append(ids)
        labels.append(lab)
    width = max(len(r) for r in rows)
    pad = pad_id(tokenizer)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    label_t = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(rows, labels)):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
        label_t[i, :len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device), "labels": label_t.to(device)}


def token_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per row: the fraction of labelled tokens the model predicts (teacher forcing)."""
    pred = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    mask = target != -100
    hits = ((pred == target) & mask).sum(1).float()
    return hits / mask.sum(1).clamp(min=1).float()

