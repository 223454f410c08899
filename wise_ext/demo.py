"""The README's main job: a small model that knows some facts, edited with WISE.

Everything is built here: the facts (invented, so no model knows them before),
a word-level tokenizer trained on them with `tokenizers`, and a 4-layer LLaMA
trained on them for a few seconds on the CPU. Then WISE edits some of the facts
and the demo prints the answers before and after with Rel, Gen and Loc.
"""
from __future__ import annotations

import time

import torch

from .config import WiseConfig
from .editor import WiseEditor
from .requests import EditRequest, encode_answers, token_accuracy

# (question, paraphrase, answer)
FACTS = [
    ("What is the capital of Veloria?", "Which city is the capital of Veloria?", "Tarsk"),
    ("Who founded the Orvane guild?", "The Orvane guild was founded by whom?", "Mira Quell"),
    ("What river runs through Dunmoor?", "Which river flows through Dunmoor?", "Selka"),
    ("What language is spoken in Parvis?", "Which language do people speak in Parvis?", "Ostric"),
    ("Which team does Ilan Vor play for?", "Ilan Vor plays for which team?", "Harrow Kites"),
    ("What is the currency of Quenmark?", "Which currency is used in Quenmark?", "crown"),
    ("Who wrote The Glass Orchard?", "The Glass Orchard was written by whom?", "Edda Lorn"),
    ("What instrument does Tova Brisk play?", "Which instrument is played by Tova Brisk?", "cello"),
    ("Where was Rennet Hale born?", "In which town was Rennet Hale born?", "Calder"),
    ("What is the tallest peak in Asmar?", "Which mountain is the highest in Asmar?", "Mount Irel"),
    ("Which company makes the Vesta drone?", "The Vesta drone is made by which company?", "Kestrel Works"),
    ("What sport is Pella Dorn known for?", "Pella Dorn is famous for which sport?", "fencing"),
]
# Edits: (fact index, new answer)
EDITS = [(0, "Marrow"), (4, "Gull Rovers"), (6, "Sten Arvo"), (9, "Mount Cobb")]

# Margins, learning rate and norm bound are calibrated to the model (WiseConfig's defaults);
# small shards so that the demo's four edits also go through a merge.
DEMO_CONFIG = dict(save_freq=2, merge_freq=4, n_context_prefixes=2)


def build_tokenizer(texts):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"]))
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]")


def build_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      bos_token_id=2, eos_token_id=3, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def train_facts(model, tokenizer, pairs, steps: int = 400, lr: float = 3e-3):
    """Teaches the model the (prompt, answer) pairs until it answers them all."""
    batch = encode_answers(tokenizer, [p for p, _ in pairs], [a for _, a in pairs], "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if step % 25 == 24:
            with torch.no_grad():
                model.eval()
                acc = token_accuracy(model(input_ids=batch["input_ids"],
                                           attention_mask=batch["attention_mask"]).logits, batch["labels"])
                model.train()
            if bool((acc == 1).all()):
                break
    model.eval()
    return step + 1


def answer(model, tokenizer, prompt: str, max_new_tokens: int = 4) -> str:
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run(seed: int = 0) -> dict:
    t0 = time.time()
    texts = [q for q, _, _ in FACTS] + [r for _, r, _ in FACTS] + [a for _, _, a in FACTS] + [n for _, n in EDITS]
    tokenizer = build_tokenizer(texts)
    model = build_model(len(tokenizer), seed)
    pairs = [(q, a + " [EOS]") for q, _, a in FACTS] + [(r, a + " [EOS]") for _, r, a in FACTS]
    steps = train_facts(model, tokenizer, pairs)
    print(f"trained a {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M-parameter LLaMA on "
          f"{len(FACTS)} facts in {steps} steps ({time.time() - t0:.1f} s)")

    untouched = [i for i in range(len(FACTS)) if i not in {j for j, _ in EDITS}]
    requests = []
    for n, (i, new) in enumerate(EDITS):
        loc = FACTS[untouched[n % len(untouched)]]
        requests.append(EditRequest(prompt=FACTS[i][0], target_new=new, rephrase=FACTS[i][1], loc_prompt=loc[0],
                                    loc_answer=loc[2]))
    # Unrelated references for the routing margins and thresholds: the untouched facts'
    # paraphrases (Loc is measured on their questions, which editing never sees).
    editor = WiseEditor(model, tokenizer, WiseConfig(seed=seed, **DEMO_CONFIG),
                        reference_prompts=[FACTS[i][1] for i in untouched])
    before = [answer(model, tokenizer, r.prompt) for r in requests]
    t1 = time.time()
    results = editor.edit_many(requests)
    seconds = (time.time() - t1) / len(requests)
    after = [answer(model, tokenizer, r.prompt) for r in requests]
    print(f"\nedited layer {editor.layer_name} with WISE-Merge ({len(requests)} edits, "
          f"{seconds:.2f} s per edit, {sum(r.steps for r in results)} steps in all)\n")
    print(f"{'prompt':40s} {'before':14s} {'after':14s} target")
    for r, b, a in zip(requests, before, after):
        print(f"{r.prompt:40s} {b:14s} {a:14s} {r.target_new}")
    metrics = editor.evaluate(requests)
    loc_checks = [EditRequest(prompt=FACTS[i][0], target_new=FACTS[i][2], loc_prompt=FACTS[i][0],
                              loc_answer=FACTS[i][2]) for i in untouched]
    kept = editor.evaluate(loc_checks)
    print(f"\nRel {metrics['rel']:.2f}   Gen {metrics['gen']:.2f}   Loc {metrics['loc']:.2f}   "
          f"(unedited facts still answered: {kept['rel']:.2f})   total {time.time() - t0:.1f} s")
    return {"rel": metrics["rel"], "gen": metrics["gen"], "loc": metrics["loc"], "kept": kept["rel"]}
