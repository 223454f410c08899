"""Command line: wise-ext demo | edit | eval (also python -m wise_ext)."""
from __future__ import annotations

import argparse
import json
import sys


def _load_model(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    return model, tokenizer


def _table(metrics: dict, extra: dict) -> str:
    rows = {"Rel": metrics["rel"], "Gen": metrics["gen"], "Loc": metrics["loc"], **extra}
    width = max(len(k) for k in rows)
    return "\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in rows.items())


def cmd_demo(args) -> int:
    from .demo import run

    run(seed=args.seed)
    return 0


def cmd_edit(args) -> int:
    import time

    from .config import WiseConfig
    from .editor import WiseEditor
    from .requests import load_requests

    model, tokenizer = _load_model(args.model)
    config = WiseConfig.from_yaml(args.config) if args.config else WiseConfig()
    requests = load_requests(args.data, args.num_edits)
    editor = WiseEditor(model, tokenizer, config)
    t0 = time.time()
    editor.edit_many(requests, progress=True)
    seconds = (time.time() - t0) / max(1, len(requests))
    metrics = editor.evaluate(requests)
    print(_table(metrics, {"edits": len(requests), "sec/edit": seconds, "layer": editor.layer_name}))
    editor.save_pretrained(args.out)
    print(f"saved to {args.out}")
    return 0


def cmd_eval(args) -> int:
    from .editor import WiseEditor
    from .requests import load_requests

    model, tokenizer = _load_model(args.model)
    editor = WiseEditor.from_pretrained(model, args.checkpoint, tokenizer)
    requests = load_requests(args.data, args.num_edits)
    metrics = editor.evaluate(requests)
    print(_table(metrics, {"records": len(requests)}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: metrics[k] for k in ("rel", "gen", "loc", "n")}, f, indent=2)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="wise-ext", description="WISE lifelong model editing")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="teach a small model facts, edit some with WISE, print before/after")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("edit", help="lifelong editing on a ZsRE-format JSON file; saves a checkpoint")
    p.add_argument("--model", required=True, help="a Hugging Face causal LM directory")
    p.add_argument("--data", required=True, help="JSON list of edit records (ZsRE or EasyEdit fields)")
    p.add_argument("--config", help="WISE YAML (wise-ext or EasyEdit hparams)")
    p.add_argument("--num-edits", type=int, default=None)
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.set_defaults(func=cmd_edit)
    p = sub.add_parser("eval", help="evaluate a saved checkpoint on a data file")
    p.add_argument("--model", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--num-edits", type=int, default=None)
    p.add_argument("--json", help="also write the metrics here")
    p.set_defaults(func=cmd_eval)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"wise-ext {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
