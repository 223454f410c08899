"""Turns a pytest-benchmark JSON into the compact results file committed under
bench/results/: device, commit, torch, and per case the median beside its baseline.

    python bench/summarize.py RAW.json bench/results/cpu-ops.json
"""
import json
import platform
import subprocess
import sys

import torch

BASELINES = {"wise_ext": ("topk", "clone"), "wise_ffn": ("two_products", None)}


def main(raw_path: str, out_path: str) -> None:
    raw = json.load(open(raw_path))
    medians = {b["name"]: b["stats"]["median"] * 1e3 for b in raw["benchmarks"]}
    extra = {b["name"]: b["extra_info"] for b in raw["benchmarks"]}
    rows = []
    for name, median in medians.items():
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
