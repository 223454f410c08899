"""CPU benchmarks of the operators against the plain-PyTorch ways (bench/baselines.py).

    pytest bench/bench_ops.py --benchmark-only --benchmark-columns=median,iqr,rounds

Ratios are taken from medians measured in the same run; the memory floor of the
merge is (K+1 inputs read + 1 output written) at the bandwidth of a clone of base
measured alongside.
"""
import pytest
import torch

import wise_ext

from baselines import ties_merge_topk, two_products, wise_layer_unfused
from conftest import peak_rss_growth_mb

SHAPE = (4096, 11008)  # LLaMA-2-7B down_proj
DENSITY = 0.53


def merge_inputs(k, frac):
    g = torch.Generator().manual_seed(k)
    base = torch.randn(SHAPE, generator=g)
    tensors = []
    for _ in range(k):
        touched = torch.rand(SHAPE, generator=g) < frac
        tensors.append(torch.where(touched, base + 0.01 * torch.randn(SHAPE, generator=g), base))
    return base, tensors, [1.0 / k] * k


@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("frac", [0.2, 1.0], ids=["sparse20", "dense"])
@pytest.mark.parametrize("impl", ["wise_ext", "topk", "clone"])
def test_ties_merge_cpu(benchmark, impl, k, frac):
    if impl == "topk" and frac == 1.0 and k > 2:
        pytest.skip("the dense topk baseline at K > 2 takes minutes; K=2 gives the ratio")
    base, tensors, weights = merge_inputs(k, frac)
    benchmark.group = f"ties_merge K={k} {'dense' if frac == 1.0 else '20% touched'}"
    benchmark.extra_info.update(k=k, frac=frac, bytes_floor=(k + 2) * base.numel() * 4)
    if impl == "wise_ext":
        benchmark.pedantic(wise_ext.ties_merge, (base, tensors, weights, DENSITY), rounds=5, warmup_rounds=1)
    elif impl == "topk":
        benchmark.pedantic(ties_merge_topk, (base, tensors, weights, DENSITY), rounds=1, warmup_rounds=0)
    else:
        benchmark.pedantic(base.clone, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("k", [2, 8])
@pytest.mark.parametrize("impl", ["wise_ext", "topk"])
def test_ties_merge_cpu_peak_memory(benchmark, impl, k):
    code = f"""
import sys, torch, wise_ext
sys.path.insert(0, {repr(__file__.rsplit('/', 1)[0])})
from baselines import ties_merge_topk
from bench_ops import merge_inputs
base, tensors, weights = merge_inputs({k}, 0.2)
# measure
out = {'wise_ext.ties_merge' if impl == 'wise_ext' else 'ties_merge_topk'}(base, tensors, weights, {DENSITY})
"""
    growth = benchmark.pedantic(peak_rss_growth_mb, (code,), rounds=1, warmup_rounds=0)
    out_mb = SHAPE[0] * SHAPE[1] * 4 / 2**20
    benchmark.extra_info.update(peak_rss_growth_mb=growth, output_mb=out_mb, ratio_to_output=growth / out_mb)
    print(f"\n{impl} K={k}: peak RSS growth {growth:.0f} MB = {growth / out_mb:.2f} x the output")


ROUTING_SHAPES = {"1x32": (1, 32), "8x128": (8, 128)}


@pytest.mark.parametrize("shape", list(ROUTING_SHAPES))
@pytest.mark.parametrize("impl", ["wise_ffn", "two_products", "unfused"])
def test_wise_ffn_cpu(benchmark, impl, shape):
    # EasyEdit's measured tiny LLaMA: down_proj of hidden 256, FFN 688.
    batch, tokens = ROUTING_SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(batch, tokens, 688, generator=g)
    w_main = torch.randn(256, 688, generator=g) * 0.05
    w_side = w_main + 0.01 * torch.randn(256, 688, generator=g)
    thr = torch.tensor([1.0])
    benchmark.group = f"wise_ffn {shape}"
    if impl == "wise_ffn":
        w_sides = w_side.unsqueeze(0)
        benchmark(torch.ops.wise_ext.wise_ffn, a, w_main, w_sides, None, thr, None, "mean", "none", False)
    elif impl == "two_products":
        benchmark(two_products, a, w_main, w_side)
    else:
        if batch > 1:
            pytest.skip("EasyEdit's layer takes one sequence per call")
        benchmark(wise_layer_unfused, a, w_main, w_side, 1.0)
