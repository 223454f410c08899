"""Checkpoints of edited layers: safetensors memories plus a JSON config and state.

No pickle. Every file is written to a temporary name in the target directory and
renamed into place, so an interrupted save never leaves a half-written file.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import WiseConfig
from .layer import WiseLayer, bind_attention_mask
from .surgery import get_module, model_fingerprint, set_module

# 2: each open shard holds the earlier open shards' changes (1: each held only its own).
FORMAT = "wise-ext/2"
READABLE = ("wise-ext/1", FORMAT)
TENSORS = "wise_memories.safetensors"
CONFIG = "wise_config.json"


def _atomic_write(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: str, editor, training_state: bool = False) -> None:
    os.makedirs(path, exist_ok=True)
    layer: WiseLayer = editor.layer
    tensors = {"memories": layer.memories.detach().contiguous().cpu(),
               "thresholds": layer.thresholds.detach().contiguous().cpu()}
    # The edit moments are derived (from the edits), but summed edit by edit: one sum of all of them
    # rounds otherwise, and a resumed run would drift from the unbroken one.
    moments = {}
    if training_state:
        moments = {i: (n, m) for i, (n, m) in editor._moments.items() if isinstance(m, torch.Tensor)}
    tensors.update({f"moment.{i}": m.detach().contiguous().cpu() for i, (_, m) in moments.items()})
    meta = {
        "format": FORMAT,
        "config": editor.config.to_dict(),
        "layer": editor.layer_name,
        "routing": {"act": layer.routing_act, "reduce": layer.token_reduce, "sticky": layer.sticky_routing,
                    "select": layer.select},
        "fingerprint": model_fingerprint(editor.model, editor.layer_name, layer.weight),
        "state": editor.state.to_dict(),
    }
    if training_state:
        meta["training"] = {"moment_edits": {str(i): n for i, (n, _) in moments.items()}}
    _atomic_write(os.path.join(path, TENSORS), lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    _atomic_write(os.path.join(path, CONFIG), lambda tmp: _write_json(tmp, meta))


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, allow_nan=True)
        f.flush()
        os.fsync(f.fileno())


def read_checkpoint(path: str) -> tuple[dict, dict]:
    config_path, tensor_path = os.path.join(path, CONFIG), os.path.join(path, TENSORS)
    if not (os.path.isfile(config_path) and os.path.isfile(tensor_path)):
        raise FileNotFoundError(f"{path} is not a wise-ext checkpoint (expected {CONFIG} and {TENSORS})")
    with open(config_path) as f:
        meta = json.load(f)
    if meta.get("format") not in READABLE:
        raise ValueError(f"{config_path}: unknown checkpoint format {meta.get('format')!r}, expected one of "
                         f"{READABLE}")
    return meta, load_file(tensor_path)


def check_fingerprint(model: nn.Module, meta: dict) -> nn.Module:
    """The module the checkpoint edits, after checking it is the one it was made for."""
    expected = meta["fingerprint"]
    module = get_module(model, meta["layer"])
    if isinstance(module, WiseLayer):
        raise ValueError(f"{meta['layer']} already carries a WiseLayer: detach it first")
    weight = module.weight
    found = model_fingerprint(model, meta["layer"], weight)
    for key in ("model_type", "weight_shape"):
        if found[key] != expected[key]:
            raise ValueError(f"checkpoint was made for a model with {key}={expected[key]!r}, "
                             f"but this model has {key}={found[key]!r} at {meta['layer']}")
    return module


def attach(model: nn.Module, path: str) -> WiseLayer:
    """Installs a saved WiseLayer into ``model`` for inference; returns the layer.
    ``detach(model)`` (or ``wise_ext.detach``) restores the base model."""
    meta, tensors = read_checkpoint(path)
    module = check_fingerprint(model, meta)
    routing = meta["routing"]
    layer = WiseLayer(module, routing_act=routing["act"], token_reduce=routing["reduce"],
                      sticky_routing=routing["sticky"], select=routing.get("select", "score"))
    layer.load_memories(tensors["memories"], tensors["thresholds"])
    set_module(model, meta["layer"], layer)
    layer._attach_hooks = bind_attention_mask(model, layer)
    return layer


def detach(model: nn.Module) -> nn.Module:
    """Removes every attached WiseLayer, restoring the wrapped modules."""
    for name, module in list(model.named_modules()):
        if isinstance(module, WiseLayer):
            for h in getattr(module, "_attach_hooks", []):
                h.remove()
            set_module(model, name, module.base_layer)
    return model


def load_checkpoint(cls, model: nn.Module, path: str, tokenizer=None):
    meta, tensors = read_checkpoint(path)
    check_fingerprint(model, meta)
    config = WiseConfig.from_dict({**meta["config"], "layer": meta["layer"]})
    editor = cls(model, tokenizer, config)
    editor.layer.routing_act = meta["routing"]["act"]
    # An older retrieve checkpoint picked the newest memory that fires: it goes on routing as it was trained.
    editor.layer.select = meta["routing"].get("select", editor.layer.select)
    editor.layer.load_memories(tensors["memories"], tensors["thresholds"])
    from .editor import EditorState

    editor.state = EditorState.from_dict(meta["state"])
    device = editor.layer.weight.device
    editor._moments = {int(i): (n, tensors[f"moment.{i}"].to(device))
                       for i, n in meta.get("training", {}).get("moment_edits", {}).items()}
    if meta["format"] == "wise-ext/1":
        _stack_open_shards(editor)
    return editor


def _stack_open_shards(editor) -> None:
    """A format-1 editor's open shards to format 2: shard k gains the changes of the
    open shards before it, so the next merge (of each shard's increment) is unchanged."""
    shards, memories = editor.state.shards, editor.layer.memories
    origin = editor._shard_origin().detach()  # the main weight is a parameter: keep the buffer out of any graph
    total = torch.zeros_like(origin)
    for index in shards:
        own = memories[index] - origin
        memories[index] += total
        total += own
