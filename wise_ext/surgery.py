"""Finding and swapping the edited module inside a Hugging Face model."""
from __future__ import annotations


import torch
from torch import nn

_ACT_NAMES = {
    "silu": "silu", "swish": "silu", "relu": "relu", "gelu": "gelu",
    "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "gelu_tanh",
}


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The list of transformer blocks and its dotted path (LLaMA/Mistral/Qwen2: model.layers; GPT-2/GPT-J: transformer.h)."""
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return path, obj
    raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}: pass WiseConfig.layer explicitly")


def default_layer(model: nn.Module) -> str:
    """The FFN value (down) projection of a block about 5/6 deep, as WISE edits layer 27 of LLaMA-2-7B's 32."""
    path, blocks = decoder_blocks(model)
    index = len(blocks) - max(1, len(blocks) // 6) - 1
    index = max(0, index)
    block = blocks[index]
    for name in ("mlp.down_proj", "mlp.c_proj", "mlp.fc_out", "mlp.dense_4h_to_h"):
        try:
            block.get_submodule(name)
            return f"{path}.{index}.{name}"
        except AttributeError:
            continue
    raise ValueError(f"cannot find the FFN output projection in block {index} of {type(model).__name__}")


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"layer {name!r} does not exist in {type(model).__name__}") from None


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def block_index_of(model: nn.Module, name: str) -> int:
    path, blocks = decoder_blocks(model)
    prefix = path + "."
    if not name.startswith(prefix):
        raise ValueError(f"layer {name!r} is not inside the decoder blocks {path}")
    return int(name[len(prefix):].split(".")[0])


def model_activation(model: nn.Module) -> str:
    cfg = model.config
    name = getattr(cfg, "hidden_act", None) or getattr(cfg, "activation_function", None) or "none"
    return _ACT_NAMES.get(name, "none")


def is_transposed(module: nn.Module) -> bool:
    """GPT-2's Conv1D keeps its weight as (in, out); nn.Linear as (out, in)."""
    if isinstance(module, nn.Linear):
        return False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return True
    raise ValueError(f"WISE edits an nn.Linear or GPT-2 Conv1D, got {type(module).__name__}")


def model_fingerprint(model: nn.Module, layer: str, weight: torch.Tensor) -> dict:
    """What a checkpoint must match to be attached to a model."""
    return {
        "model_type": getattr(model.config, "model_type", type(model).__name__),
        "layer": layer,
        "weight_shape": list(weight.shape),
        "weight_dtype": str(weight.dtype).replace("torch.", ""),
    }
