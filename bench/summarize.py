"""Turns a pytest-benchmark JSON into the compact results file committed under
bench/results/: device, commit, torch, and per case the median beside its baseline.

    python bench/summarize.py RAW.json bench/results/cpu-ops.json          # bench_ops.py
    python bench/summarize.py RAW.json bench/results/cpu-model.json        # bench_model.py: per group,
                                                                           # each case's ratio to its reference
"""
import json
import platform
import subprocess
import sys

import torch

BASELINES = {"wise_ext": ("topk", "clone"), "wise_ffn": ("two_products", None)}
REFERENCES = ("unedited", "whole_model")  # bench_model.py: what each group is compared with


def model_rows(raw: dict) -> list[dict]:
    groups: dict = {}
    for b in raw["benchmarks"]:
        case = b["name"].partition("[")[2].rstrip("]")
        groups.setdefault(b["group"], {})[case] = b["stats"]
    rows = []
    for group, cases in groups.items():
        ref = next((c for c in cases if c.split("-")[0] in REFERENCES), None)
        for case, st in cases.items():
            rows.append({"group": group, "case": case, "median_ms": round(st["median"] * 1e3, 3),
                         "iqr_ms": round(st["iqr"] * 1e3, 3), "rounds": st["rounds"],
                         "ratio_to_reference": round(st["median"] / cases[ref]["median"], 3) if ref else None,
                         "reference": ref})
    return rows


def main(raw_path: str, out_path: str) -> None:
    raw = json.load(open(raw_path))
    medians = {b["name"]: b["stats"]["median"] * 1e3 for b in raw["benchmarks"]}
    extra = {b["name"]: b["extra_info"] for b in raw["benchmarks"]}
    rows = [] if "model" not in out_path else model_rows(raw)
    for name, median in medians.items() if not rows else ():
        test, _, params = name.partition("[")
        parts = params.rstrip("]").split("-")
        impl = parts[0]
        if impl not in BASELINES:
            continue
        baseline, floor = BASELINES[impl]
        other = name.replace(f"[{impl}-", f"[{baseline}-")
        row = {"bench": test.removeprefix("test_"), "shape": "-".join(parts[1:]), "dtype": "float32",
               "median_ms": round(median, 3), "baseline": baseline,
               "baseline_median_ms": round(medians[other], 3) if other in medians else None}
        if "peak_rss_growth_mb" in extra[name]:
            row["peak_rss_growth_x_output"] = round(extra[name]["ratio_to_output"], 2)
        if floor and "k" in extra[name]:
            k = extra[name]["k"]
            clone = medians[name.replace(f"[{impl}-", f"[{floor}-")]
            row["k_or_tokens"] = k
            row["floor_ms"] = round(clone * (k + 2) / 2, 3)  # clone moves 2 arrays; the merge K+2
        rows.append(row)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {"device": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
           "commit": commit, "torch": torch.__version__, "results": rows}
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
