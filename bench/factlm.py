"""A testbed model that knows facts: a small LLaMA trained from scratch on ZsRE records.

Every record gives three question -> answer texts: its question (`src`) and its
paraphrase (`rephrase`) with the original answer (`answers[0]`), and its Natural
Questions locality question (`loc`) with `loc_ans`. The model is trained on them
until it answers them (teacher-forced answer-token accuracy >= the target), so
that edits on it change knowledge the model really holds, and Loc checks answers
it really gives. Deterministic from the seed; cached on disk, keyed by the spec
and the data file's hash.

    python bench/factlm.py            # trains (or finds) the default testbed and reports its accuracy
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from wise_ext.requests import encode_answers, token_accuracy

HERE = Path(__file__).resolve().parent
DATA_DIR = Path(os.environ.get("WISE_EXT_DATA", HERE.parent.parent / "shared" / "data"))
ZSRE = DATA_DIR / "zsre" / "zsre_mend_eval.json"
CACHE = HERE / ".cache"


@dataclass(frozen=True)
class FactLMSpec:
    n_records: int = 1236
    vocab_size: int = 4000
    hidden: int = 256
    ffn: int = 688
    layers: int = 4
    heads: int = 4
    max_epochs: int = 80
    batch_size: int = 32
    lr: float = 2e-3
    warmup_epochs: int = 2
    target_accuracy: float = 0.95
    seed: int = 0

    def key(self, data_path: Path) -> str:
        digest = hashlib.sha256(Path(data_path).read_bytes()).hexdigest()[:12]
        spec = hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]
        return f"factlm-{spec}-{digest}"


def zsre_records(path: Path = ZSRE, limit: int | None = None) -> list[dict]:
    if not Path(path).exists():
        raise FileNotFoundError(f"ZsRE records not found at {path}: set WISE_EXT_DATA to the shared data folder")
    with open(path) as f:
        return json.load(f)[:limit]


def question_answer_pairs(records: list[dict]) -> dict[str, list[tuple[str, str]]]:
    """The texts the testbed learns, by group."""
    return {
        "question": [(r["src"], r["answers"][0]) for r in records],
        "paraphrase": [(r["rephrase"], r["answers"][0]) for r in records],
        "locality": [(r["loc"], r["loc_ans"]) for r in records],
    }


def build_tokenizer(records: list[dict], vocab_size: int):
    """A BPE tokenizer trained on every text of the records, new targets included
    (so an edit's target is made of known pieces, as in a real vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [r[k] for r in records for k in ("src", "rephrase", "alt", "loc", "loc_ans")]
    texts += [a for r in records for a in r["answers"]]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size,
                                                       special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def build_model(spec: FactLMSpec, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=spec.hidden, intermediate_size=spec.ffn,
                      num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                      num_key_value_heads=spec.heads, max_position_embeddings=128,
                      bos_token_id=2, eos_token_id=3, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _batches(pairs, tokenizer, batch_size: int, generator: torch.Generator):
    """Batches of similar length (less padding), in a random order each epoch."""
    order = torch.randperm(len(pairs), generator=generator).tolist()
    lengths = [len(tokenizer(pairs[i][0])["input_ids"]) for i in order]
    order = [i for _, i in sorted(zip(lengths, order), key=lambda t: t[0])]
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for j in torch.randperm(len(chunks), generator=generator).tolist():
        yield [pairs[i] for i in chunks[j]]


def answer_loss(model, batch) -> torch.Tensor:
    """Cross-entropy on the answer tokens only; the LM head runs on those positions alone."""
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    logits = model.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits, labels[keep])


@torch.no_grad()
def accuracy(model, tokenizer, pairs, batch_size: int = 128) -> float:
    model.eval()
    hits = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        batch = encode_answers(tokenizer, [p for p, _ in chunk], [a for _, a in chunk], "cpu")
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        hits.append(token_accuracy(logits, batch["labels"]))
    return float(torch.cat(hits).mean())


def train(spec: FactLMSpec, records: list[dict], log=print):
    tokenizer = build_tokenizer(records, spec.vocab_size)
    model = build_model(spec, len(tokenizer))
    groups = question_answer_pairs(records)
    pairs = [p for g in groups.values() for p in g]
    steps_per_epoch = math.ceil(len(pairs) / spec.batch_size)
    total, warmup = spec.max_epochs * steps_per_epoch, spec.warmup_epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    gen = torch.Generator().manual_seed(spec.seed)
    t0, report = time.time(), {}
    for epoch in range(1, spec.max_epochs + 1):
        model.train()
        losses = []
        for chunk in _batches(pairs, tokenizer, spec.batch_size, gen):
            batch = encode_answers(tokenizer, [p for p, _ in chunk], [a for _, a in chunk], "cpu")
            loss = answer_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
        line = f"epoch {epoch:3d}  loss {sum(losses) / len(losses):.4f}  {time.time() - t0:6.0f} s"
        if epoch % 5 == 0 or epoch == spec.max_epochs:
            acc = {name: accuracy(model, tokenizer, g) for name, g in groups.items()}
            line += "  " + "  ".join(f"{k} {v:.3f}" for k, v in acc.items())
            report = {"epochs": epoch, "seconds": round(time.time() - t0, 1), "accuracy": acc}
            if min(acc.values()) >= spec.target_accuracy:
                log(line)
                break
        log(line)
    model.eval()
    return model, tokenizer, report


def load_or_train(spec: FactLMSpec = FactLMSpec(), data_path: Path = ZSRE, cache: Path = CACHE, log=print):
    """The testbed model and tokenizer: from the cache, or trained and then cached."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(cache) / spec.key(data_path)
    if not (folder / "report.json").exists():
        records = zsre_records(data_path, spec.n_records)
        model, tokenizer, report = train(spec, records, log)
        if min(report["accuracy"].values()) < spec.target_accuracy:
            log(f"warning: the testbed reached {report['accuracy']}, below the target {spec.target_accuracy}")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "report.json").write_text(json.dumps({"spec": dataclasses.asdict(spec), **report}, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    return model, tokenizer, json.loads((folder / "report.json").read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=FactLMSpec.n_records)
    p.add_argument("--epochs", type=int, default=FactLMSpec.max_epochs)
    p.add_argument("--lr", type=float, default=FactLMSpec.lr)
    p.add_argument("--ffn", type=int, default=FactLMSpec.ffn, help="FFN width: the edited layer's input features")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    spec = FactLMSpec(n_records=args.records, max_epochs=args.epochs, lr=args.lr, ffn=args.ffn)
    _, _, report = load_or_train(spec)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
