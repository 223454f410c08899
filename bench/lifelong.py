"""The paper's lifelong protocol on real ZsRE records: T sequential edits, evaluated after the last.

Testbeds: the fact-knowing LLaMA of bench/factlm.py, and a tiny random LLaMA
(hidden 256, 4 layers) with the same tokenizer. Edits are records 0..T-1 (prompt
`src`, new target `alt`, paraphrase `rephrase`, locality `loc` / `loc_ans`). The
routing references (margin loss, locality guard) are the locality questions of
records 1000-1255 with their answers (as the paper's scripts build them: the guard
must see texts as long as the locality prompts it keeps off), never evaluated. Each (testbed, margins, mode, T) starts from a
fresh model. Shards: save_freq = T/4 and merge_freq = 2 x save_freq, so every run
goes through merges (WISE-Merge) or freezes memories (WISE-Retrieve).

    python bench/lifelong.py                       # fact-LM T = 10, 100; random LLaMA T = 10, 40
    python bench/lifelong.py --T 10 100 1000 --testbeds factlm
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

import torch

import factlm
from wise_ext import WiseConfig, WiseEditor
from wise_ext.requests import EditRequest, encode_answers

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "lifelong-factlm.json"
REFERENCE = slice(1000, 1256)
PAPER_MARGINS = dict(act_margin=(5.0, 20.0, 10.0), edit_lr=1.0, norm_constraint=1.0)  # EasyEdit's llama-7b


CODE = ("../wise_ext", "../csrc", "*.py")  # what a run executes, as pathspecs from bench/


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, check=True).stdout.strip()


def commit() -> str:
    """HEAD, with "+dirty" where the code a run executes differs from it (a long run's row must name
    the code it ran, not what was committed while it ran)."""
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", *CODE)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def same_code(started: str) -> bool:
    """Whether the code is still what the run started from (later commits may change docs and results)."""
    if started.endswith("+dirty") or started == "unknown" or commit().endswith("+dirty"):
        return False
    return subprocess.run(["git", "diff", "--quiet", started, "--", *CODE], cwd=HERE).returncode == 0


class RunCheckpoint:
    """A run's editor, saved with its training state every ``every`` edits, so that a stopped run goes on
    where it stopped, bit for bit as the unbroken run (WiseEditor.save_pretrained(training_state=True)).
    Each save is a new folder renamed into place: a stop mid-save leaves the last whole one."""

    PROGRESS = "progress.json"

    def __init__(self, root: Path, key: str, every: int):
        self.folder, self.every = root / key, every
        self.old = self.folder.with_name(self.folder.name + ".old")

    def load(self) -> Optional[dict]:
        if not self.folder.exists() and self.old.exists():  # stopped between the two renames
            self.old.rename(self.folder)
        path = self.folder / self.PROGRESS
        return json.loads(path.read_text()) if path.exists() else None

    def due(self, done: int, total: int) -> bool:
        return done % self.every == 0 or done == total

    def save(self, editor: WiseEditor, progress: dict) -> None:
        tmp = self.folder.with_name(self.folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        editor.save_pretrained(str(tmp), training_state=True)
        (tmp / self.PROGRESS).write_text(json.dumps(progress))
        if self.folder.exists():
            self.folder.rename(self.old)
        tmp.rename(self.folder)
        shutil.rmtree(self.old, ignore_errors=True)


def references(records: list[dict]) -> list[str]:
    return [f"{r['loc']} {r['loc_ans']}" for r in records[REFERENCE]]


def random_llama(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, bos_token_id=2, eos_token_id=3, pad_token_id=0)).eval()


@torch.no_grad()
def routing_scores(editor: WiseEditor, prompts: list[str], answers: list[str]) -> list[float]:
    """Each text's highest routing score over the side memories, as inference computes it."""
    out = []
    for i in range(0, len(prompts), 32):
        batch = encode_answers(editor.tokenizer, prompts[i:i + 32], answers[i:i + 32], "cpu")
        editor.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        out += editor.layer.last_scores.max(1).values.tolist()
    return out


def run_one(testbed: str, margins: str, mode: str, T: int, records: list[dict], progress: bool = False,
            checkpoint: Optional[RunCheckpoint] = None) -> tuple[dict, dict]:
    if testbed == "factlm":
        model, tokenizer, _ = factlm.load_or_train(log=lambda *_: None)
    else:
        tokenizer = factlm.build_tokenizer(records, factlm.FactLMSpec.vocab_size)
        model = random_llama(tokenizer)
    save_freq = max(1, T // 4)
    config = WiseConfig(save_freq=save_freq, merge_freq=2 * save_freq, retrieve=mode == "retrieve",
                        **(PAPER_MARGINS if margins == "paper" else {}))
    requests = [EditRequest.from_dict(r) for r in records[:T]]
    run = {"commit": commit(), "threads": torch.get_num_threads(), "done": 0, "seconds": 0.0, "steps": [],
           "resumed_at": []}
    saved = checkpoint.load() if checkpoint else None
    if saved is None:
        editor = WiseEditor(model, tokenizer, config, reference_prompts=references(records))
    else:
        if not same_code(saved["commit"]) or saved["threads"] != run["threads"]:
            raise SystemExit(f"{checkpoint.folder} was saved by the code at {saved['commit']} with "
                             f"{saved['threads']} threads; this is {run['commit']} with {run['threads']}: "
                             "a resumed run must be the same run (remove the folder to start again)")
        editor = WiseEditor.from_pretrained(model, str(checkpoint.folder), tokenizer)
        run = {**saved, "resumed_at": saved["resumed_at"] + [saved["done"]]}
    order = range(run["done"], T)
    if progress:
        from tqdm import tqdm

        order = tqdm(order, desc="editing", unit="edit", initial=run["done"], total=T)
    for i in order:
        t0 = time.perf_counter()
        run["steps"].append(editor.edit(requests[i]).steps)
        run["seconds"] += time.perf_counter() - t0
        run["done"] = i + 1
        if checkpoint and checkpoint.due(run["done"], T):
            checkpoint.save(editor, run)
    seconds = run["seconds"] / T
    metrics = editor.evaluate(requests)
    rel = metrics["per_request"]["rel"]
    row = {"testbed": testbed, "margins": margins, "mode": mode, "T": T, "rel": round(metrics["rel"], 4),
           "gen": round(metrics["gen"], 4), "loc": round(metrics["loc"], 4), "sec_per_edit": round(seconds, 3),
           "steps_per_edit": round(sum(run["steps"]) / T, 1),
           "rel_halves": [round(sum(h) / len(h), 4) for h in (rel[:T // 2], rel[T // 2:]) if h],
           "threads": run["threads"], "commit": run["commit"]}
    if run["resumed_at"]:
        row["resumed_at"] = run["resumed_at"]  # the same run: a training checkpoint resumes bit for bit
    scores = {
        "edited": routing_scores(editor, [r.prompt for r in requests], [r.target_new for r in requests]),
        "paraphrase": routing_scores(editor, [r.rephrase for r in requests], [r.target_new for r in requests]),
        "unrelated": routing_scores(editor, [r.loc_prompt for r in requests], [r.loc_answer for r in requests]),
        "threshold": editor.layer.thresholds.tolist(),
    }
    return row, scores


def plot(rows: list[dict], histograms: dict, out_dir: Path, suffix: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
    for ax, metric in zip(axes, ("rel", "gen", "loc")):
        for key in sorted({(r["testbed"], r["margins"], r["mode"]) for r in rows}):
            pts = sorted((r["T"], r[metric]) for r in rows if (r["testbed"], r["margins"], r["mode"]) == key)
            ax.plot(*zip(*pts), marker="o", label=" / ".join(key))
        ax.set_xscale("log")
        ax.set_title(metric.capitalize())
        ax.set_xlabel("T (edits)")
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "lifelong-metrics.png", dpi=110)

    fig, axes = plt.subplots(1, len(histograms), figsize=(4.5 * len(histograms), 3.4), squeeze=False)
    for ax, (name, scores) in zip(axes[0], histograms.items()):
        for kind in ("edited", "paraphrase", "unrelated"):
            ax.hist(scores[kind], bins=30, alpha=0.5, label=kind)
        for t in scores["threshold"]:
            ax.axvline(t, color="k", lw=0.8, ls="--")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("routing score (dashed: thresholds)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / f"lifelong-routing-scores{suffix}.png", dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[10, 100], help="edit counts on the fact-LM")
    p.add_argument("--random-T", type=int, nargs="+", default=[10, 40], help="edit counts on the random LLaMA")
    p.add_argument("--paper-T", type=int, nargs="+", default=[10, 100],
                   help="edit counts on the fact-LM with the paper's margins (the comparison rows)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--testbeds", nargs="+", default=["factlm", "random"], choices=["factlm", "random"])
    p.add_argument("--modes", nargs="+", default=["merge", "retrieve"], choices=["merge", "retrieve"])
    p.add_argument("--margins", nargs="+", default=["calibrated", "paper"], choices=["calibrated", "paper"])
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--progress", action="store_true", help="a progress bar of the edits on stderr")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="save each run's editor here every --checkpoint-every edits, and resume a run from it "
                        "(same code, same threads); a finished run's folder re-evaluates it")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--table", action="store_true", help="print --out's calibrated rows as the README's table and stop")
    p.add_argument("--append", action="store_true",
                   help="keep the rows already in --out (a long T run after the short ones), replacing those this "
                        "run repeats; its score histograms go to lifelong-routing-scores[-paper]-<T>-<mode>.png")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return
    torch.set_num_threads(args.threads)
    records = factlm.zsre_records()
    rows, histograms, shown = [], {}, set()
    if args.append and args.out.exists():
        rows = json.loads(args.out.read_text())
    for testbed in args.testbeds:
        for margins in args.margins:
            for mode in args.modes:
                counts = args.random_T if testbed == "random" else args.paper_T if margins == "paper" else args.T
                for T in counts:
                    saves = args.checkpoint and RunCheckpoint(args.checkpoint, f"{testbed}-{margins}-{mode}-T{T}",
                                                              args.checkpoint_every)
                    row, scores = run_one(testbed, margins, mode, T, records, args.progress, saves or None)
                    key = (testbed, margins, mode, T)
                    rows = [r for r in rows if (r["testbed"], r["margins"], r["mode"], r["T"]) != key] + [row]
                    print(json.dumps(row), flush=True)
                    write_rows(rows, args.out)  # every finished row survives an interrupted run
                    if T == max(counts):
                        histograms[f"{testbed}, {margins} margins, {mode}, T={T}"] = scores
                        shown.add(T)
    # an appended run's histograms go beside the earlier ones, named after what they show
    tag = [*(["paper"] if args.margins == ["paper"] else []), *map(str, sorted(shown)), *args.modes]
    plot(rows, histograms, args.out.parent, "-".join(["", *tag]) if args.append else "")


def table(rows: list[dict]) -> str:
    """The calibrated rows as markdown: one line per (testbed, mode), one column per T, a resumed row marked."""
    rows = [r for r in rows if r["margins"] == "calibrated"]
    counts = sorted({r["T"] for r in rows})
    lines = ["| testbed | mode | " + " | ".join(f"T = {t}" for t in counts) + " |", "|---|---|" + "---|" * len(counts)]
    for testbed, mode in sorted({(r["testbed"], r["mode"]) for r in rows}):
        cells = []
        for t in counts:
            r = next((r for r in rows if (r["testbed"], r["mode"], r["T"]) == (testbed, mode, t)), None)
            cells.append("" if r is None else f"{r['rel']:.2f} / {r['gen']:.2f} / {r['loc']:.2f}"
                         + (" (resumed)" if r.get("resumed") else "") + f" `{r['commit']}`")
        lines.append(f"| {'fact-LM' if testbed == 'factlm' else 'random LLaMA'} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_rows(rows: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
