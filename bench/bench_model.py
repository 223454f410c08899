"""End-to-end benchmarks: routing inside a real model, and the cost of one edit.

    pytest bench/bench_model.py --benchmark-only --benchmark-columns=median,iqr,rounds

- Inference: a LLaMA-shaped model (random init: 8 layers, hidden 1024, FFN 2752,
  fp32 on the CPU) unedited, with a WISE layer at layer 6 in merge mode (one side
  memory) and in retrieve mode with 1, 4 and 16 memories: forward of 1x32 and
  8x128 tokens, and greedy ``generate`` of 16 tokens. Ratios are to the unedited
  model in the same run.
- Editing: one 70-step edit on an 8-layer LLaMA (hidden 256, FFN 688) at layer 6,
  ``WiseEditor.edit`` (blocks below replayed, LM head on answer tokens only)
  against the loop that runs the whole model every step (bench/baselines.py).
"""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from baselines import edit_whole_model_every_step
from wise_ext import WiseConfig, WiseEditor
from wise_ext.layer import WiseLayer, bind_attention_mask
from wise_ext.requests import EditRequest

LAYER = "model.layers.6.mlp.down_proj"


def llama(hidden, ffn, layers=8, vocab=4000, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()


@pytest.fixture(scope="module")
def big():
    return llama(1024, 2752)


def with_memories(model, n):
    """Installs a WiseLayer with n side memories (0: the unedited model)."""
    base = model.get_submodule(LAYER)
    layer = base if isinstance(base, WiseLayer) else None
    if layer is None and n == 0:
        return []
    if layer is None:
        layer = WiseLayer(base, routing_act="silu")
        model.model.layers[6].mlp.down_proj = layer
        layer._hooks = bind_attention_mask(model, layer)
    if n == 0:
        for h in layer._hooks:
            h.remove()
        model.model.layers[6].mlp.down_proj = layer.base_layer
        return []
    g = torch.Generator().manual_seed(n)
    w = layer.weight.detach()
    layer.load_memories(torch.stack([w + 1e-3 * torch.randn(w.shape, generator=g) for _ in range(n)]),
                        torch.zeros(n))  # threshold 0: every sequence routes to a side memory (the dearer path)
    return layer._hooks


MODES = {"unedited": 0, "merge": 1, "retrieve-1": 1, "retrieve-4": 4, "retrieve-16": 16}


@pytest.mark.parametrize("shape", ["1x32", "8x128"])
@pytest.mark.parametrize("mode", list(MODES))
def test_forward(benchmark, big, mode, shape):
    batch, tokens = map(int, shape.split("x"))
    ids = torch.randint(3, 4000, (batch, tokens), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with_memories(big, MODES[mode])
    benchmark.group = f"forward {shape}"
    benchmark.extra_info["memories"] = MODES[mode]
    with torch.no_grad():
        benchmark.pedantic(big, kwargs=dict(input_ids=ids, attention_mask=mask), rounds=7 if batch == 1 else 3,
                           warmup_rounds=1)
    with_memories(big, 0)


@pytest.mark.parametrize("mode", ["unedited", "merge", "retrieve-16"])
def test_generate(benchmark, big, mode):
    ids = torch.randint(3, 4000, (1, 32), generator=torch.Generator().manual_seed(2))
    with_memories(big, MODES[mode])
    benchmark.group = "generate 32+16 tokens"
    with torch.no_grad():
        benchmark.pedantic(big.generate, kwargs=dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                     max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                                     pad_token_id=0), rounds=3, warmup_rounds=1)
    with_memories(big, 0)


def edit_setup():
    from factlm import build_tokenizer, zsre_records

    records = zsre_records(limit=64)
    tokenizer = build_tokenizer(records, 2000)
    model = llama(256, 688, vocab=len(tokenizer))
    model.config.bos_token_id = tokenizer.bos_token_id
    # early_stop_loss 0: all 70 steps run in both implementations.
    config = WiseConfig(layer=LAYER, n_iter=70, early_stop_loss=0.0, n_context_prefixes=4)
    editor = WiseEditor(model, tokenizer, config, reference_prompts=[r["loc"] for r in records[32:36]])
    requests = [EditRequest.from_dict(r) for r in records[:8]]
    editor.edit(requests[0])  # calibrates margins and learning rate, samples the prefixes
    return editor, requests


@pytest.mark.parametrize("impl", ["wise_ext", "whole_model"])
def test_edit(benchmark, impl):
    editor, requests = edit_setup()
    benchmark.group = "one edit, 70 steps, 8-layer LLaMA (256 wide), layer 6"
    if impl == "wise_ext":
        it = iter(requests[1:])
        benchmark.pedantic(lambda: editor.edit(next(it)), rounds=5, warmup_rounds=1)
        return
    from wise_ext.requests import encode_answers

    s = editor.state
    req = requests[1]
    prompts = [req.prompt] + [p + req.prompt for p in s.context_prefixes]
    unrelated = s.reference_prompts[:4]
    batch = encode_answers(editor.tokenizer, prompts + unrelated, [req.target_new] * len(prompts)
                           + [None] * len(unrelated), "cpu")
    seed = s.shard_seeds[str(s.shards[-1])]
    args = (editor.model, editor.layer, batch, len(prompts), 70, s.edit_lr, s.margins, editor.config.mask_ratio,
            seed, editor._norm_constraint())
    benchmark.pedantic(edit_whole_model_every_step, args, rounds=5, warmup_rounds=1)
