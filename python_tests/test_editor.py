"""The editor on tiny Hugging Face models of each supported architecture."""
import dataclasses
import json
import os

import pytest
import torch
import transformers

import wise_ext
from wise_ext import WiseConfig, WiseEditor, ops
from wise_ext.demo import build_tokenizer
from wise_ext.margin import KeptTexts, kept_margin
from wise_ext.preconditioner import second_moment
from wise_ext.requests import EditRequest

TEXTS = ["What is the capital of Veloria ? Tarsk Marrow", "Who wrote The Glass Orchard ? Edda Lorn Sten Arvo",
         "The weather today is fine", "Which city is the capital of Veloria ?", "Where was Rennet Hale born ? Calder"]
EDIT = EditRequest("What is the capital of Veloria ?", "Marrow", rephrase="Which city is the capital of Veloria ?",
                   loc_prompt="Where was Rennet Hale born ?", loc_answer="Calder")
EDIT2 = EditRequest("Who wrote The Glass Orchard ?", "Sten Arvo", loc_prompt="The weather today is")
FAST = dict(n_iter=3, n_context_prefixes=1, n_reference_samples=2)

ARCHS = {
    "gpt2": (transformers.GPT2Config, dict(n_embd=32, n_layer=3, n_head=4, n_positions=64), "transformer.h.1.mlp.c_proj"),
    "llama": (transformers.LlamaConfig, dict(hidden_size=32, intermediate_size=72, num_hidden_layers=3,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
              "model.layers.1.mlp.down_proj"),
    "mistral": (transformers.MistralConfig, dict(hidden_size=32, intermediate_size=72, num_hidden_layers=3,
                                                 num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=64), "model.layers.1.mlp.down_proj"),
    "qwen2": (transformers.Qwen2Config, dict(hidden_size=32, intermediate_size=72, num_hidden_layers=3,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
              "model.layers.1.mlp.down_proj"),
    "gptj": (transformers.GPTJConfig, dict(n_embd=32, n_layer=3, n_head=4, n_positions=64, rotary_dim=4),
             "transformer.h.1.mlp.fc_out"),
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TEXTS)


def make_model(arch, tokenizer, seed=0):
    cls, kwargs, _ = ARCHS[arch]
    torch.manual_seed(seed)
    cfg = cls(vocab_size=len(tokenizer), bos_token_id=2, eos_token_id=3, pad_token_id=0, **kwargs)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def logits(model, tokenizer, texts):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("arch", list(ARCHS))
def test_default_layer_edit_save_load_detach(arch, tokenizer, tmp_path):
    model = make_model(arch, tokenizer)
    base = logits(model, tokenizer, TEXTS)
    editor = WiseEditor(model, tokenizer, WiseConfig(**FAST))
    assert editor.layer_name == ARCHS[arch][2]
    assert torch.equal(logits(model, tokenizer, TEXTS), base)  # no memory yet: the base model exactly
    editor.edit_many([EDIT, EDIT2])
    assert editor.layer.num_memories == 1 and torch.isfinite(editor.layer.thresholds).all()
    editor.layer.set_threshold(0, 0.0)  # route everything to the side memory: edits must show
    edited = logits(model, tokenizer, TEXTS)
    assert not torch.equal(edited, base)
    editor.save_pretrained(str(tmp_path))

    fresh = make_model(arch, tokenizer)
    wise_ext.attach(fresh, str(tmp_path))
    assert torch.equal(logits(fresh, tokenizer, TEXTS), edited)
    wise_ext.detach(fresh)
    assert torch.equal(logits(fresh, tokenizer, TEXTS), base)

    editor.detach()
    assert torch.equal(logits(model, tokenizer, TEXTS), base)


def test_from_pretrained_continues_editing(tokenizer, tmp_path):
    model = make_model("llama", tokenizer)
    editor = WiseEditor(model, tokenizer, WiseConfig(save_freq=2, merge_freq=4, **FAST))
    editor.edit(EDIT)
    editor.save_pretrained(str(tmp_path))
    again = WiseEditor.from_pretrained(make_model("llama", tokenizer), str(tmp_path), tokenizer)
    assert again.state == editor.state and again.config == editor.config
    assert torch.equal(again.layer.memories, editor.layer.memories)
    again.edit(EDIT2)
    editor.edit(EDIT2)
    assert torch.equal(again.layer.memories, editor.layer.memories)


@pytest.mark.parametrize("retrieve", [False, True])
def test_a_run_resumed_from_a_training_checkpoint_is_the_unbroken_run(retrieve, tokenizer, tmp_path):
    """Saved mid-shard with its training state, an editor goes on, across merges, bit for bit as it
    would have (a lifelong benchmark run can stop and resume); without it, only close."""
    third = EditRequest("Where was Rennet Hale born ?", "Tarsk")
    stream = [EDIT, EDIT2, third, EDIT2, EDIT, third, EDIT]  # merges (or freezes) after edits 3 and 6
    cfg = WiseConfig(save_freq=3, merge_freq=3, retrieve=retrieve, n_rehearsal=2, consolidate_epochs=1,
                     consolidate_repair_passes=1, **FAST)
    editor = WiseEditor(make_model("llama", tokenizer), tokenizer, cfg)
    editor.edit_many(stream[:5])  # the open shard holds two edits, its moment summed edit by edit
    editor.save_pretrained(str(tmp_path / "training"), training_state=True)
    editor.save_pretrained(str(tmp_path / "inference"))
    resumed = WiseEditor.from_pretrained(make_model("llama", tokenizer), str(tmp_path / "training"), tokenizer)
    approx = WiseEditor.from_pretrained(make_model("llama", tokenizer), str(tmp_path / "inference"), tokenizer)
    for e in (editor, resumed, approx):
        e.edit_many(stream[5:])
    assert resumed.state == editor.state
    assert torch.equal(resumed.layer.memories, editor.layer.memories)
    assert torch.equal(resumed.layer.thresholds, editor.layer.thresholds)
    torch.testing.assert_close(approx.layer.memories, editor.layer.memories, rtol=1e-3, atol=1e-4)
    assert wise_ext.attach(make_model("llama", tokenizer), str(tmp_path / "training")).num_memories == 2


def test_a_format_1_checkpoint_loads_with_its_open_shards_stacked(tokenizer, tmp_path):
    from safetensors.torch import save_file

    from wise_ext import checkpoint

    model = make_model("llama", tokenizer)
    editor = WiseEditor(model, tokenizer, WiseConfig(save_freq=1, merge_freq=3, **FAST))
    editor.edit_many([EDIT, EDIT2])
    editor.save_pretrained(str(tmp_path))
    meta, tensors = checkpoint.read_checkpoint(str(tmp_path))
    stacked = tensors["memories"]
    # Format 1 kept each open shard's own change only, and routed by the highest score.
    own = stacked.clone()
    own[1] = stacked[1] - stacked[0] + editor.layer.weight.detach()
    meta["format"] = "wise-ext/1"
    del meta["routing"]["select"]
    save_file({"memories": own, "thresholds": tensors["thresholds"]}, str(tmp_path / checkpoint.TENSORS))
    (tmp_path / checkpoint.CONFIG).write_text(json.dumps(meta))
    again = WiseEditor.from_pretrained(make_model("llama", tokenizer), str(tmp_path), tokenizer)
    torch.testing.assert_close(again.layer.memories, stacked, rtol=0, atol=1e-6)
    assert not again.layer.memories.requires_grad  # the main weight, a parameter, stays out of the buffer's graph
    assert wise_ext.attach(make_model("llama", tokenizer), str(tmp_path)).select == "score"


def test_batch_routes_each_sequence_on_its_own(tokenizer):
    model = make_model("llama", tokenizer)
    editor = WiseEditor(model, tokenizer, WiseConfig(**FAST))
    editor.edit(EDIT)
    texts = [EDIT.prompt, "The weather today is fine", EDIT2.prompt]
    logits(model, tokenizer, texts)
    scores = editor.layer.last_scores[:, 0]
    # A threshold between the scores: some sequences go to the side memory, some stay on the main one.
    ordered = scores.sort().values
    editor.layer.set_threshold(0, float(ordered[0] + ordered[1]) / 2)
    together = logits(model, tokenizer, texts)
    choice = editor.layer.last_choice.tolist()
    assert -1 in choice and 0 in choice
    for i, text in enumerate(texts):
        alone = logits(model, tokenizer, [text])
        n = alone.shape[1]
        torch.testing.assert_close(together[i, :n], alone[0], rtol=1e-4, atol=1e-5)
        assert editor.layer.last_choice.item() == choice[i]


def test_padding_does_not_change_routing(tokenizer):
    model = make_model("llama", tokenizer)
    editor = WiseEditor(model, tokenizer, WiseConfig(**FAST))
    editor.edit(EDIT)
    logits(model, tokenizer, [EDIT.prompt])
    alone = editor.layer.last_scores.clone()
    tokenizer.padding_side = "left"
    try:
        logits(model, tokenizer, [EDIT.prompt, TEXTS[1] + " " + TEXTS[4]])
    finally:
        tokenizer.padding_side = "right"
    torch.testing.assert_close(editor.layer.last_scores[0], alone[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("retrieve", [False, True])
def test_shards_merges_and_thresholds_over_a_stream(retrieve, tokenizer):
    model = make_model("gpt2", tokenizer)
    cfg = WiseConfig(save_freq=2, merge_freq=2 if retrieve else 4, retrieve=retrieve, **FAST)
    editor = WiseEditor(model, tokenizer, cfg)
    stream = [EDIT, EDIT2] * 3  # 6 edits
    for n, req in enumerate(stream, 1):
        editor.edit(req)
        s = editor.state
        assert s.n_edits == n
        assert editor.layer.num_memories == len(s.min_scores) == len(s.memory_edits)
        assert sum(len(e) for e in s.memory_edits) == n
        # Every threshold sits above the unrelated reference prompts: they stay on the main memory.
        logits(model, tokenizer, s.reference_prompts)
        assert editor.layer.last_choice.tolist() == [-1] * len(s.reference_prompts)
    s = editor.state
    if retrieve:
        assert len(s.retrieved) == 3 and s.shards == [] and editor.layer.num_memories == 3
    else:
        # merges after edits 4; edits 5-6 form a shard on top of the merged memory
        assert s.merged is not None and len(s.shards) == 1 and editor.layer.num_memories == 2
    assert s.n_shards == 3


@pytest.mark.parametrize("normalize", [False, True])
def test_two_shards_merge_into_one_memory(normalize, tokenizer, monkeypatch):
    calls = []
    real = wise_ext.ops.ties_merge

    def spy(base, tensors, *args):
        calls.append((base.clone(), [t.clone() for t in tensors], args, real(base, tensors, *args)))
        return calls[-1][-1]

    monkeypatch.setattr(wise_ext.ops, "ties_merge", spy)
    model = make_model("llama", tokenizer)
    cfg = WiseConfig(save_freq=1, merge_freq=2, merge_normalize=normalize, density=1.0, consolidate_epochs=0,
                     consolidate_repair_passes=0, **FAST)
    editor = WiseEditor(model, tokenizer, cfg)
    editor.edit(EDIT)
    editor.edit(EDIT2)  # the second edit starts a second shard, then both merge
    assert editor.layer.num_memories == 1 and editor.state.merged == 0 and editor.state.shards == []
    (base, shards, args, merged), = calls
    assert len(shards) == 2 and not torch.equal(shards[0], shards[1])
    assert torch.equal(editor.layer.memories[0], merged)
    # Untrimmed, agreeing changes add up (the sum each shard was trained toward) or are averaged.
    deltas = torch.stack([t - base for t in shards])
    agree = deltas[0] * deltas[1] > 0
    assert agree.any()
    expected = deltas.sum(0) / (2 if normalize else 1)
    torch.testing.assert_close((merged - base)[agree], expected[agree])


def test_generate_with_kv_cache_and_sticky_routing(tokenizer):
    model = make_model("llama", tokenizer)
    editor = WiseEditor(model, tokenizer, WiseConfig(sticky_routing=True, **FAST))
    editor.edit(EDIT)
    editor.layer.set_threshold(0, 0.0)
    batch = tokenizer([EDIT.prompt], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3
    assert editor.layer.last_choice.tolist() == [0]
    # With sticky routing the generated tokens follow the prompt's memory: the same as routing every step to it.
    editor.layer.sticky_routing = False
    again = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(out, again)


def test_easyedit_yaml_loads(tmp_path):
    path = tmp_path / "llama-7b.yaml"
    path.write_text(
        "alg_name: \"WISE\"\nmodel_name: \"./hugging_cache/llama-2-7b\"\ndevice: 0\n"
        "mask_ratio: 0.2\nedit_lr: 1.0\nn_iter: 70\nnorm_constraint: 1.0\nact_margin: [5.0, 20.0, 10.0]\n"
        "act_ratio: 0.88\nsave_freq: 500\nmerge_freq: 1000\nmerge_alg: 'ties'\nobjective_optimization: 'only_label'\n"
        "inner_params:\n- model.layers[27].mlp.down_proj.weight\nweights: 1.0\ndensities: 0.53\n"
        "retrieve: True\nreplay: False\nmodel_parallel: false\n")
    cfg = WiseConfig.from_yaml(str(path))
    assert cfg.layer == "model.layers.27.mlp.down_proj"
    assert cfg.act_margin == (5.0, 20.0, 10.0) and cfg.density == 0.53 and cfg.retrieve and cfg.merge_freq == 1000
    bad = tmp_path / "bad.yaml"
    bad.write_text("mask_ratio: 0.2\nlearning_rate_typo: 3\n")
    with pytest.raises(ValueError, match="learning_rate_typo"):
        WiseConfig.from_yaml(str(bad))


def test_bad_requests_change_nothing(tokenizer, tmp_path):
    model = make_model("llama", tokenizer)
    with pytest.raises(ValueError, match="layer 'model.layers.9.mlp.down_proj' does not exist"):
        WiseEditor(model, tokenizer, WiseConfig(layer="model.layers.9.mlp.down_proj"))
    editor = WiseEditor(model, tokenizer, WiseConfig(**FAST))
    with pytest.raises(ValueError, match="target_new is empty"):
        editor.edit({"prompt": "What is the capital of Veloria ?", "target_new": " "})
    with pytest.raises(ValueError, match="longer than the model's context"):
        editor.edit(EditRequest(" ".join(["Veloria"] * 80), "Marrow"))
    assert editor.layer.num_memories == 0 and editor.state.n_edits == 0
    editor.edit(EDIT)
    editor.save_pretrained(str(tmp_path))
    other = make_model("gpt2", tokenizer)
    with pytest.raises(ValueError, match="does not exist|model_type"):
        wise_ext.attach(other, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a wise-ext checkpoint"):
        wise_ext.attach(make_model("llama", tokenizer), str(tmp_path / "missing"))


def test_checkpoint_is_safetensors_and_json(tokenizer, tmp_path):
    model = make_model("llama", tokenizer)
    editor = WiseEditor(model, tokenizer, WiseConfig(**FAST))
    editor.edit(EDIT)
    editor.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["wise_config.json", "wise_memories.safetensors"]
    meta = json.loads((tmp_path / "wise_config.json").read_text())
    assert meta["layer"] == editor.layer_name and meta["state"]["n_edits"] == 1


def test_evaluate_reports_rel_gen_loc(tokenizer):
    model = make_model("llama", tokenizer)
    editor = WiseEditor(model, tokenizer, WiseConfig(**FAST))
    before = editor.evaluate([EDIT])
    assert before["loc"] == 1.0  # nothing edited: locality is perfect by definition
    editor.edit(EDIT)
    editor.layer.set_threshold(0, 0.0)
    after = editor.evaluate([EDIT])
    assert set(after) >= {"rel", "gen", "loc"} and 0 <= after["rel"] <= 1 and 0 <= after["loc"] <= 1


ZSRE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "zsre", "zsre_mend_eval.json")


@pytest.mark.skipif(not os.path.exists(ZSRE), reason="needs ../shared/data/zsre")
def test_cli_edit_and_eval_on_zsre_records(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from wise_ext.cli import main
    from wise_ext.requests import load_requests

    records = load_requests(ZSRE, 3)
    texts = [t for r in records for t in (r.prompt, r.target_new, r.rephrase, r.loc_prompt, r.loc_answer)]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[BOS]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, bos_token_id=2, pad_token_id=0))
    model_dir, ckpt = tmp_path / "model", tmp_path / "ckpt"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = tmp_path / "wise.yaml"
    config.write_text("n_iter: 2\nn_context_prefixes: 1\nsave_freq: 1\nmerge_freq: 2\n")
    assert main(["edit", "--model", str(model_dir), "--data", ZSRE, "--config", str(config), "--num-edits", "3",
                 "--out", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "Rel" in out and "Loc" in out and "sec/edit" in out
    assert main(["eval", "--model", str(model_dir), "--checkpoint", str(ckpt), "--data", ZSRE, "--num-edits", "3",
                 "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["n"] == 3 and 0 <= metrics["rel"] <= 1
    assert main(["eval", "--model", str(model_dir), "--checkpoint", str(tmp_path / "nope"), "--data", ZSRE]) == 2


def test_a_shard_starts_from_the_open_shards_and_the_newest_answers(tokenizer, monkeypatch):
    """The merge adds the open shards' changes together, so a new shard starts from the
    newest open one (its edits train with the earlier shards' changes in place), the
    merge takes each shard's increment, and between merges the newest shard answers."""
    calls = []
    real = wise_ext.ops.ties_merge
    monkeypatch.setattr(wise_ext.ops, "ties_merge", lambda base, tensors, *a: calls.append(
        [t - base for t in tensors]) or real(base, tensors, *a))
    model = make_model("llama", tokenizer)
    editor = WiseEditor(model, tokenizer, WiseConfig(save_freq=1, merge_freq=3, **FAST))
    third = EditRequest("Where was Rennet Hale born ?", "Tarsk")
    editor.edit(EDIT)
    first = editor.layer.memories[0].clone()
    editor.edit(EDIT2)
    second = editor.layer.memories[1].clone()
    features = editor._shard_features(1)
    # The second shard holds the first one's changes, and changed only its own features.
    changed = (second - first).abs().sum(0) > 0
    assert changed.any() and not changed[~features].any()
    untouched = ~features
    assert torch.equal(second[:, untouched], first[:, untouched])
    assert editor.layer.weight.grad is None  # the base model's weight stays out of the edit's graph
    # Both shards fire on an edit of the first: the newest answers.
    editor.layer.thresholds.fill_(-1.0)
    logits(model, tokenizer, [EDIT.prompt])
    assert editor.layer.select == "latest" and editor.layer.last_choice.tolist() == [1]
    editor.edit(third)
    (increments,) = calls
    base = editor.layer.weight
    torch.testing.assert_close(increments[0], first - base, rtol=0, atol=1e-6)
    torch.testing.assert_close(increments[1], second - first, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_edit_session_computes_what_the_model_computes(arch, tokenizer):
    """The cached edit forward (lower blocks and the edited block replayed) gives the
    logits the whole model gives with the side memory in place."""
    from wise_ext.edit_session import EditSession, answer_logits

    model = make_model(arch, tokenizer)
    editor = WiseEditor(model, tokenizer, WiseConfig(**FAST))
    batch = editor._edit_batch(EDIT)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    side = model.get_submodule(editor.layer_name).weight.detach() + 0.05 * torch.randn_like(editor.layer.weight)
    editor.layer.add_memory(side, threshold=0.0)  # everything routes to it
    with torch.no_grad():
        full = model(**inputs).logits
        with EditSession(model, editor.layer, editor.block_index, inputs, side) as session:
            assert session.additive  # every supported architecture adds the projection into the residual
            fast, target = answer_logits(model, session.hidden(), batch["labels"])
    keep = batch["labels"][:, 1:] != -100
    torch.testing.assert_close(fast, full[:, :-1][keep], rtol=1e-4, atol=1e-5)
    assert torch.equal(target, batch["labels"][:, 1:][keep])


def test_an_edit_answers_the_new_target_and_leaves_unrelated_prompts_alone(tokenizer):
    model = make_model("llama", tokenizer)
    unrelated = ["The weather today is fine", "Where was Rennet Hale born ?", "Who wrote The Glass Orchard ?"]
    base = logits(model, tokenizer, unrelated)
    predicted = tokenizer.decode(logits(model, tokenizer, [EDIT.prompt])[0, -1].argmax())
    target = next(w for w in ("Marrow", "Tarsk", "Calder") if w != predicted)  # an answer the model does not give
    request = EditRequest(EDIT.prompt, target, rephrase=EDIT.rephrase)
    # The question is in the half the steps train against; the other half (held out) sets the guard. In this
    # 33-token world a held-out question's layer inputs are nearly the edit's own, which no guard can tell apart.
    editor = WiseEditor(model, tokenizer, WiseConfig(n_context_prefixes=2), reference_prompts=[unrelated[1], unrelated[0]])
    assert editor.evaluate([request])["rel"] == 0.0
    result = editor.edit(request)
    assert result.score > result.threshold  # the edit's own prompt routes to the side memory
    assert editor.evaluate([request])["rel"] == 1.0
    assert torch.equal(logits(model, tokenizer, unrelated), base)  # not just close: the main memory answers
    s = editor.state
    assert s.routing_scale > 0 and s.edit_lr > 0
    assert s.margins == pytest.approx([r * s.routing_scale for r in editor.config.relative_margin])


def test_absolute_margins_far_from_the_model_scale_warn(tokenizer):
    model = make_model("llama", tokenizer)
    editor = WiseEditor(model, tokenizer, WiseConfig(act_margin=(5.0, 20.0, 10.0), edit_lr=1.0, **FAST))
    with pytest.warns(UserWarning, match="act_margin .* the scale"):
        editor.edit(EDIT)
    assert editor.state.margins == [5.0, 20.0, 10.0] and editor.state.edit_lr is None


@pytest.mark.parametrize("retrieve", [False, True])
def test_a_merge_consolidates_the_memory_on_all_its_edits(retrieve, tokenizer, monkeypatch):
    fits = []
    real = WiseEditor._fit

    def spy(self, index, batch, features, precond, ratio, seed, origin, kept, n_iter, least):
        # The floor a consolidation pass holds the edits to, as the memory stands when the pass starts.
        guard_floor = max(self.state.margins[1], self._guard(index) / self.config.act_ratio)
        fits.append((self.state.n_edits, batch, features, kept.n_texts, n_iter, precond, least, guard_floor))
        return real(self, index, batch, features, precond, ratio, seed, origin, kept, n_iter, least)

    monkeypatch.setattr(WiseEditor, "_fit", spy)
    third = EditRequest("Where was Rennet Hale born ?", "Tarsk")
    merge_freq = 1 if retrieve else 3
    cfg = WiseConfig(save_freq=1, merge_freq=merge_freq, retrieve=retrieve, consolidate_epochs=2, consolidate_batch=2,
                     consolidate_steps=3, consolidate_repair_passes=0, **{**FAST, "n_iter": 6})
    editor = WiseEditor(make_model("llama", tokenizer), tokenizer, cfg)
    editor.edit_many([EDIT, EDIT2, third])
    n_refs = editor._reference_rows().n_rows
    held = {False: [EDIT, EDIT2, third], True: [third]}[retrieve]  # the edits of the last memory merged
    consolidation = [f for f in fits if f[0] == 3]  # the merge after the third edit
    assert len(consolidation) == 2 * ((len(held) + 1) // 2)  # two passes in batches of two
    assert {f[4] for f in fits if f[2] is not None} == {6}  # edits (a feature shard each): n_iter steps
    # Both modes: the step protects the memory's own edits, as merge mode's held merged memory does.
    own = editor._preconditioner(None, [editor.state.retrieved[-1] if retrieve else editor.state.merged])
    assert not torch.allclose(own, editor._preconditioner(None, []))
    for _, batch, features, n_texts, n_iter, precond, *_ in consolidation:
        assert features is None and torch.equal(batch["span"], editor._routing_mask(batch).float()) and n_iter == 3
        assert torch.allclose(precond, own)
        # Retrieve: the memory stays under the earlier frozen memories' edits, not its own.
        assert n_texts == n_refs + (2 if retrieve else 0)
    # Edits are held to beta; a consolidation pass to 1/act_ratio above the memory's guard as the pass starts,
    # where the threshold sits under every edit that reaches it.
    assert all(f[6] == editor.state.margins[1] for f in fits if f[2] is not None)
    starts = consolidation[::(len(held) + 1) // 2]
    assert len(starts) == 2 and all(f[6] == pytest.approx(f[7]) for f in starts)
    assert all(f[6] >= editor.state.margins[1] for f in consolidation)
    assert any(f[7] > editor.state.margins[1] for f in starts)  # the guard, not beta, sets it here
    expected = sorted(wise_ext.requests.encode_answers(tokenizer, [r.prompt], [r.target_new], "cpu")["input_ids"][0].tolist()
                      for r in held)
    for epoch in (consolidation[:len(consolidation) // 2], consolidation[len(consolidation) // 2:]):
        # Each pass trains every edit of the memory once, as prompt and answer.
        assert sorted(row[row != 0].tolist() for _, b, *_ in epoch for row in b["input_ids"]) == expected

    # Consolidated, the merged memory answers its edits better than the merge left it.
    def answer_loss(ed):
        ed.layer.thresholds.fill_(0.0)
        batch = wise_ext.requests.encode_answers(tokenizer, [r.prompt for r in held], [r.target_new for r in held], "cpu")
        with torch.no_grad():
            return float(ed.model(**batch).loss)

    monkeypatch.setattr(WiseEditor, "_fit", real)
    plain = WiseEditor(make_model("llama", tokenizer), tokenizer, dataclasses.replace(cfg, consolidate_epochs=0))
    plain.edit_many([EDIT, EDIT2, third])
    assert answer_loss(editor) < answer_loss(plain)
    for name in ("consolidate_batch", "consolidate_steps"):
        with pytest.raises(ValueError, match=name):
            WiseConfig(**{name: 0})


def test_repair_passes_train_only_the_unsettled_edits(tokenizer, monkeypatch):
    """After the full passes, each repair pass trains exactly the edits the memory does not answer
    or that score under the floor, and they stop once none is left."""
    third = EditRequest("Where was Rennet Hale born ?", "Tarsk")
    reqs = [EDIT, EDIT2, third]
    cfg = WiseConfig(save_freq=1, merge_freq=3, consolidate_epochs=1, consolidate_batch=2, consolidate_steps=2,
                     consolidate_repair_passes=3, **FAST)
    editor = WiseEditor(make_model("llama", tokenizer), tokenizer, cfg)
    editor.edit_many(reqs[:2])
    fits, found = [], []
    real_fit, real_unsettled = WiseEditor._fit, WiseEditor._unsettled

    def fit(self, index, batch, *args):
        fits.append((len(found), sorted(row[row != 0].tolist() for row in batch["input_ids"])))
        return real_fit(self, index, batch, *args)

    def unsettled(self, index, least):
        # The first call finds two edits unsettled (the floor above the middle score), the next none.
        if found:
            found.append([])
            return []
        rows = self._rows([r.prompt for r in reqs], [r.target_new for r in reqs])
        scores = self._scores(rows, self.layer.memories[index], self.layer.token_reduce)
        found.append(real_unsettled(self, index, float(scores.median()) + 1e-4))
        return found[-1]

    monkeypatch.setattr(WiseEditor, "_fit", fit)
    monkeypatch.setattr(WiseEditor, "_unsettled", unsettled)
    editor.edit(third)  # the merge
    assert len(found) == 2 and found[1] == [] and len(found[0]) >= 2
    full = [f for f in fits if f[0] == 0]
    repair = [ids for n, ids in fits if n == 1]
    assert len(full) == 2 + 1  # the third edit's own fit, then one full pass in batches of two
    expected = sorted(wise_ext.requests.encode_answers(tokenizer, [reqs[i].prompt], [reqs[i].target_new], "cpu")
                      ["input_ids"][0].tolist() for i in found[0])
    assert sorted(row for ids in repair for row in ids) == expected
    with pytest.raises(ValueError, match="consolidate_repair_passes"):
        WiseConfig(consolidate_repair_passes=-1)


def test_unsettled_edits_are_those_the_memory_misses(tokenizer):
    """_unsettled against the model run with the memory firing on every prompt: the edits it does
    not answer every token of, or that score under the floor."""
    third = EditRequest("Where was Rennet Hale born ?", "Tarsk")
    reqs = [EDIT, EDIT2, third, EditRequest("Who founded Orlen Vale ?", "Dorra Quill")]
    cfg = WiseConfig(save_freq=2, merge_freq=4, consolidate_epochs=0, consolidate_repair_passes=0,
                     **{**FAST, "n_iter": 2})
    editor = WiseEditor(make_model("llama", tokenizer), tokenizer, cfg)
    editor.edit_many(reqs)
    index = editor.state.merged
    editor.layer.thresholds.fill_(-1.0)  # the merged memory answers everything
    batch = wise_ext.requests.encode_answers(tokenizer, [r.prompt for r in reqs], [r.target_new for r in reqs], "cpu")
    with torch.no_grad():
        out = editor.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    answered = wise_ext.requests.token_accuracy(out.logits, batch["labels"]) == 1
    scores = editor.layer.last_scores[:, index]
    for least in (float(scores.min()) - 1, float(scores.median()), float(scores.max()) + 1):
        want = [i for i in range(len(reqs)) if not answered[i] or scores[i] < least]
        assert editor._unsettled(index, least, batch_size=3) == want


@pytest.mark.parametrize("threshold_from", ["references", "edits"])
def test_merged_memory_gets_its_own_threshold(threshold_from, tokenizer):
    model = make_model("llama", tokenizer)
    cfg = WiseConfig(save_freq=1, merge_freq=2, threshold_from=threshold_from, guard_quantile=0.9, **FAST)
    refs = ["The weather today is fine", "Where was Rennet Hale born ?", "The weather today", "Where was Calder born ?",
            "The Glass Orchard is fine", "Who was born today ?"]
    editor = WiseEditor(model, tokenizer, cfg, reference_prompts=refs)
    editor.edit(EDIT)
    editor.edit(EDIT2)
    s = editor.state
    assert s.memory_edits == [[[EDIT.prompt, EDIT.target_new], [EDIT2.prompt, EDIT2.target_new]]]
    # The merged memory's threshold is measured on it: its edits' scores, its reference guard.
    rows = editor._rows([EDIT.prompt, EDIT2.prompt], [EDIT.target_new, EDIT2.target_new])
    scores = editor._scores(rows, editor.layer.memories[0], editor.layer.token_reduce)
    held_out = editor._scores(editor._reference_rows("guard"), editor.layer.memories[0], "mean")
    assert held_out.numel() > 2
    guard = float(torch.quantile(held_out, 0.9)) / cfg.act_ratio
    def rule(edge):  # "references": the geometric midpoint where the edits' edge is above the guard
        if edge <= guard:
            return guard
        return (guard * edge) ** 0.5 if threshold_from == "references" else edge

    assert editor.layer.thresholds[0].item() == pytest.approx(rule(cfg.act_ratio * float(scores.min())), rel=1e-5)
    for edge in (2 * guard, 0.5 * guard):
        editor.state.min_scores[0] = edge / cfg.act_ratio
        assert editor._set_threshold(0) == pytest.approx(rule(edge), rel=1e-5)


def test_retrieve_guards_tighten_as_memories_are_frozen(tokenizer):
    model = make_model("llama", tokenizer)
    cfg = WiseConfig(save_freq=1, merge_freq=1, retrieve=True, guard_quantile=0.8, **FAST)
    refs = ["The weather today is fine", "Where was Rennet Hale born ?", "The weather today", "Where was Calder born ?",
            "The Glass Orchard is fine", "Who was born today ?", "The Glass Orchard", "Where was Hale born ?"]
    editor = WiseEditor(model, tokenizer, cfg, reference_prompts=refs)
    editor.edit(EDIT)
    editor.edit(EDIT2)
    assert editor.state.retrieved == [0, 1]
    # An unrelated prompt leaves the main memory when either memory fires: each guard lets through half the share.
    for m in range(2):
        held_out = editor._scores(editor._reference_rows("guard"), editor.layer.memories[m], "mean")
        guard = float(torch.quantile(held_out, 0.9)) / cfg.act_ratio
        edge = cfg.act_ratio * editor.state.min_scores[m]
        expected = (guard * edge) ** 0.5 if edge > guard else guard
        assert editor.layer.thresholds[m].item() == pytest.approx(expected, rel=1e-5)


def test_retrieve_memories_lose_on_the_frozen_ones_edits_and_win_on_their_own(tokenizer, tmp_path):
    """Retrieve picks the highest score. With replay each new memory keeps the frozen
    memories' replayed edits under the score that picks them, less gamma (never under
    alpha), and its own edits gamma above the frozen memories' scores on them."""
    model = make_model("llama", tokenizer)
    paper = WiseEditor(model, tokenizer, WiseConfig(retrieve=True, replay=False, **FAST))
    paper._calibrate()
    assert paper.layer.select == "score" and paper._kept_texts([0]).rivals == []
    paper.detach()
    cfg = WiseConfig(save_freq=1, merge_freq=1, retrieve=True, n_replay=2, consolidate_epochs=0,
                     consolidate_repair_passes=0, **{**FAST, "n_iter": 10})
    editor = WiseEditor(model, tokenizer, cfg)
    assert editor.layer.select == "score"
    third = EditRequest("Where was Rennet Hale born ?", "Tarsk")
    reqs = [EDIT, EDIT2, third]
    editor.edit_many(reqs)
    assert editor.state.retrieved == [0, 1, 2]
    # Two replayed edits spread over three frozen memories: the first's and the last's.
    expected = editor._rows([EDIT.prompt, third.prompt], [EDIT.target_new, third.target_new])
    rows, held_by = editor._replay_rows(editor.state.retrieved)
    assert torch.equal(rows.a, expected.a)
    scores = torch.stack([editor._scores(expected, editor.layer.memories[m], "mean") for m in range(3)])
    torch.testing.assert_close(held_by, scores.amax(0))
    alpha, _, gamma = editor.state.margins
    kept = editor._kept_texts()
    n_refs = editor._reference_rows("margin").n_rows
    assert kept.rivals == [0, 1, 2] and kept.led.tolist() == [True] * n_refs + [False, False]
    torch.testing.assert_close(kept.ceiling[n_refs:], torch.clamp(held_by - gamma, min=alpha))
    assert torch.all(kept.ceiling[:n_refs] == alpha)
    # Each edit is answered by its own memory: the highest score, over the older memories' by gamma.
    own = editor._rows([r.prompt for r in reqs], [r.target_new for r in reqs])
    scores = torch.stack([editor._scores(own, editor.layer.memories[m], "mean") for m in range(3)])
    for m in (1, 2):
        assert scores[m, m] > scores[:m, m].max() + gamma / 2
        assert scores[m, :m].lt(scores.diagonal()[:m]).all()
    logits(model, tokenizer, [f"{r.prompt} {r.target_new}" for r in reqs])
    assert editor.layer.last_choice.tolist() == [0, 1, 2]
    editor.save_pretrained(str(tmp_path))
    fresh = make_model("llama", tokenizer)
    assert wise_ext.attach(fresh, str(tmp_path)).select == "score"
    # A checkpoint of an earlier version, which picked the newest memory that fires, goes on routing so.
    config_path = tmp_path / "wise_config.json"
    meta = json.loads(config_path.read_text())
    meta["routing"]["select"] = "latest"
    config_path.write_text(json.dumps(meta))
    resumed = WiseEditor.from_pretrained(make_model("llama", tokenizer), str(tmp_path), tokenizer)
    assert resumed.layer.select == "latest"
    with pytest.raises(ValueError, match="n_replay"):
        WiseConfig(retrieve=True, n_replay=0)


def test_routing_mask_leaves_out_the_start_token():
    from wise_ext.layer import routing_mask

    ids = torch.tensor([[2, 5, 6, 0], [0, 2, 7, 8], [2, 0, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 0, 0]])
    mask = routing_mask(attn, ids, bos_token_id=2)
    assert mask.tolist() == [[False, True, True, False], [False, False, True, True], [True, False, False, False]]
    assert torch.equal(routing_mask(attn, ids, None), attn)
    # Decoding one token with a cache: the mask covers the past, the ids only the new token.
    step = routing_mask(torch.ones(1, 5, dtype=torch.long), torch.tensor([[9]]), 2)
    assert step.tolist() == [[True] * 5]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_feature_shard_trains_only_the_weights_that_read_its_features(arch, tokenizer):
    from wise_ext.preconditioner import shard_features

    model = make_model(arch, tokenizer)
    editor = WiseEditor(model, tokenizer, WiseConfig(mask_ratio=0.3, weight_decay=0.1, **FAST))  # decay stays on it too
    editor.edit(EDIT)
    layer = editor.layer
    delta = layer.memories[0] - layer.weight
    keep = shard_features(editor._features(), 0.3, editor.state.shard_seeds["0"])
    untouched = delta[~keep] if layer.transpose else delta[:, ~keep]
    trained = delta[keep] if layer.transpose else delta[:, keep]
    assert torch.equal(untouched, torch.zeros_like(untouched))
    assert trained.abs().max() > 0


def test_entry_shards_are_the_papers_masks(tokenizer):
    model = make_model("llama", tokenizer)
    editor = WiseEditor(model, tokenizer, WiseConfig(shard_by="entry", precondition_eps=None, **FAST))
    editor.edit(EDIT)
    delta = editor.layer.memories[0] - editor.layer.weight
    mask = ops.shard_mask(delta.shape, editor.config.mask_ratio, editor.state.shard_seeds["0"])
    assert torch.equal(delta[~mask], torch.zeros_like(delta[~mask]))
    assert delta[mask].abs().max() > 0


def test_the_locality_guard_is_measured_on_held_out_references(tokenizer):
    refs = ["The weather today is fine", "Where was Rennet Hale born ?", "Who wrote The Glass Orchard ?"]
    editor = WiseEditor(make_model("llama", tokenizer), tokenizer, WiseConfig(**FAST), reference_prompts=refs)
    train, guard = editor._reference_rows("train"), editor._reference_rows("guard")
    assert (train.n_rows, guard.n_rows) == (2, 1)  # refs 0 and 2
    torch.testing.assert_close(guard.a, editor._rows([refs[1]], None).a)
    editor.edit(EDIT)
    held_out = float(editor._scores(guard, editor.layer.memories[0], editor.layer.token_reduce).max())
    assert editor.layer.thresholds[0].item() >= held_out / editor.config.act_ratio * (1 - 1e-6)


def test_answers_that_lead_by_the_answer_margin_stop_pulling(tokenizer):
    """A random head cannot bring an answer near early_stop_loss (its logits are too small
    for confidence): with plain cross-entropy every edit runs all n_iter steps; with the
    answer margin it stops once each answer token leads by that many logit spreads."""
    cfg = dict(n_iter=40, n_context_prefixes=1, n_reference_samples=2)
    plain = WiseEditor(make_model("llama", tokenizer), tokenizer, WiseConfig(answer_margin=None, **cfg))
    assert plain.edit(EDIT).steps == 40 and plain.state.logit_spread is None
    model = make_model("llama", tokenizer)
    editor = WiseEditor(model, tokenizer, WiseConfig(answer_margin=3.0, **cfg))
    result = editor.edit(EDIT)
    assert result.steps < 40 and result.loss == 0.0
    assert editor.evaluate([EDIT])["rel"] == 1.0
    # The spread is the unedited model's: std over the vocabulary at every reference token.
    editor.detach()
    ref = logits(model, tokenizer, editor.state.reference_prompts)
    mask = tokenizer(editor.state.reference_prompts, return_tensors="pt", padding=True)["attention_mask"].bool()
    assert editor.state.logit_spread == pytest.approx(float(ref[mask].std(-1).mean()), rel=1e-5)
    # Semantics on set logits: token 0 leads by 3 spreads (no loss), token 1 by 1 spread.
    editor.state.logit_spread = 0.5
    z = torch.tensor([[2.5, 1.0, 0.0], [0.0, 0.5, 1.0]])
    targets = torch.tensor([0, 2])
    ce = torch.nn.functional.cross_entropy(z, targets, reduction="none")
    torch.testing.assert_close(editor._answer_loss(z, targets), ce[1] / 2)
    with pytest.raises(ValueError, match="answer_margin"):
        WiseConfig(answer_margin=0.0)


def test_rehearsal_trains_earlier_edits_of_the_memory_with_each_edit(tokenizer, monkeypatch):
    batches = []
    real = WiseEditor._train
    monkeypatch.setattr(WiseEditor, "_train", lambda self, index, batch: batches.append(batch) or real(self, index, batch))
    model = make_model("llama", tokenizer)
    editor = WiseEditor(model, tokenizer, WiseConfig(n_rehearsal=1, **FAST))
    third = EditRequest("Where was Rennet Hale born ?", "Tarsk")
    editor.edit_many([EDIT, EDIT2, third])
    assert [len(b["input_ids"]) for b in batches] == [2, 3, 3]  # prompt, its prefixed copy, rehearsed

    def encoded(req):
        return wise_ext.requests.encode_answers(tokenizer, [req.prompt], [req.target_new], "cpu")

    def holds(batch, row):
        n = row["input_ids"].shape[1]
        return torch.equal(batch["input_ids"][2, :n], row["input_ids"][0]) and torch.equal(
            batch["labels"][2, :n], row["labels"][0]) and bool((batch["labels"][2, n:] == -100).all())

    assert holds(batches[1], encoded(EDIT))
    assert holds(batches[2], encoded(EDIT)) or holds(batches[2], encoded(EDIT2))
    # Its routing margin covers all its tokens but the start token.
    n = encoded(EDIT)["input_ids"].shape[1]
    assert batches[1]["span"][2].sum() == n - 1 and batches[1]["span"][2, 0] == 0
    # Retrieve mode: a frozen memory's edits are not rehearsed.
    editor.detach()
    batches.clear()
    retrieve = WiseEditor(model, tokenizer, WiseConfig(n_rehearsal=1, save_freq=2, merge_freq=2, retrieve=True, **FAST))
    retrieve.edit_many([EDIT, EDIT2, third])
    assert [len(b["input_ids"]) for b in batches] == [2, 3, 2]
    with pytest.raises(ValueError, match="n_rehearsal"):
        WiseConfig(n_rehearsal=-1)


def test_the_margins_references_include_joined_runs_that_fit_the_context(tokenizer):
    """Late positions: every run of reference_join consecutive "train" references also
    joins the margin's texts, unless it is longer than the model's context. The margin's
    mean stays over the given texts, and the preconditioner and the guard see them alone."""
    refs = ["The weather today is fine", "Where was Rennet Hale born ?", "Who wrote The Glass Orchard ?",
            "What is the capital of Veloria ?", "Which city is the capital of Veloria ?"]
    editor = WiseEditor(make_model("llama", tokenizer), tokenizer, WiseConfig(reference_join=2, **FAST),
                        reference_prompts=refs)
    train, margin, guard = (editor._reference_rows(part) for part in ("train", "margin", "guard"))
    joined = margin.select(torch.arange(margin.n_rows) >= train.n_rows)
    assert (train.n_rows, joined.n_rows, guard.n_rows) == (3, 2, 2)
    torch.testing.assert_close(joined.a, editor._rows([refs[0] + " " + refs[2], refs[2] + " " + refs[4]], None).a)
    editor._calibrate()
    kept = editor._kept_texts()
    assert (kept.rows.n_rows, kept.n_texts) == (5, 3)
    torch.testing.assert_close(kept.rows.a[kept.rows.row >= 3], joined.a)
    protected = editor._protected_moment()  # no edits yet: the references' alone, per token
    torch.testing.assert_close(protected, second_moment(train.a) / train.a.shape[0])
    editor.detach()
    three = WiseEditor(make_model("llama", tokenizer), tokenizer, WiseConfig(reference_join=3, **FAST),
                       reference_prompts=refs)
    assert three._reference_rows("margin").n_rows - three._reference_rows().n_rows == 1
    three.detach()
    # Past the context (64 positions) a joined run is left out instead of failing the edit.
    long = [" ".join([refs[i]] * 7) for i in range(3)]
    assert all(35 <= len(tokenizer(t)["input_ids"]) <= 64 for t in long)
    editor = WiseEditor(make_model("llama", tokenizer), tokenizer, WiseConfig(reference_join=2, **FAST),
                        reference_prompts=long)
    editor._calibrate()
    assert editor._reference_rows("margin") is editor._reference_rows() and editor._kept_texts().rows.n_rows == 2
    editor.edit(EDIT)
    editor.detach()
    alone = WiseEditor(make_model("llama", tokenizer), tokenizer, WiseConfig(reference_join=1, **FAST),
                       reference_prompts=refs)
    alone._calibrate()
    assert alone._reference_rows("margin") is alone._reference_rows() and alone._kept_texts().n_texts == 3
    with pytest.raises(ValueError, match="reference_join"):
        WiseConfig(reference_join=0)


@pytest.mark.parametrize("gamma_shift", [0.0, 1e3])
def test_the_kept_margin_equals_the_full_one_in_value_and_gradient(tokenizer, gamma_shift):
    """Only the texts a hinge binds are differentiated; the value and the gradients are those
    of the margin over every text (each under its own ceiling, the led ones gamma under the
    edit's rows), its sums divided by the texts counted (and 0 with none binding)."""
    refs = TEXTS + ["Where was Rennet Hale born ? Calder Marrow", "The Glass Orchard"]
    editor = WiseEditor(make_model("llama", tokenizer), tokenizer, WiseConfig(**FAST), reference_prompts=refs)
    rows = editor._reference_rows()
    torch.manual_seed(1)
    start = editor.layer.weight.detach() + 0.3 * torch.randn_like(editor.layer.weight)
    full_scores = editor._scores(rows, start).detach()
    alpha = float(full_scores.median())
    gamma = float(full_scores.max() - full_scores.min()) / 2 - gamma_shift
    s_edit0 = full_scores.max() + torch.rand(3)
    # The last row stands for a replayed edit: a ceiling of its own, not led.
    ceiling = torch.full((rows.n_rows,), alpha)
    ceiling[-1] = float(full_scores[-1]) * (0.5 + torch.rand(()).item())
    led = torch.arange(rows.n_rows) < rows.n_rows - 1
    n_texts = rows.n_rows - 1  # as if one row were a joined run
    kept = KeptTexts(rows, n_texts, ceiling, led)

    def full(weight, s_edit):
        s = editor._scores(rows, weight)
        return (torch.relu(s - ceiling).sum() / n_texts
                + torch.relu(gamma - (s_edit[:, None] - s[led][None, :])).sum() / (n_texts * len(s_edit)))

    w1, e1 = start.clone().requires_grad_(True), s_edit0.clone().requires_grad_(True)
    ref = full(w1, e1)
    ref.backward()
    w2, e2 = start.clone().requires_grad_(True), s_edit0.clone().requires_grad_(True)
    got = kept_margin(kept, lambda r: editor._scores(r, w2), e2, gamma)
    got.backward()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(w2.grad, w1.grad)
    torch.testing.assert_close(e2.grad, e1.grad)
    assert 0 < int((full_scores > min(alpha, float(s_edit0.min()) - gamma)).sum()) < rows.n_rows
    # Nothing binds: no loss, nothing to differentiate.
    high = KeptTexts(rows, n_texts, torch.full((rows.n_rows,), 1e3), led)
    none = kept_margin(high, lambda r: editor._scores(r, start.clone().requires_grad_(True)), s_edit0 + 1e3, 0.0)
    assert float(none) == 0.0 and not none.requires_grad
