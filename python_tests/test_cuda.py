"""What only a GPU can show: graph capture, CPU/CUDA mixes, unaligned and
sub-vector inputs to the vectorised kernels, parity with the CPU kernels."""
import pytest
import torch

import wise_ext
from wise_ext import reference as ref

from conftest import requires_cuda

pytestmark = requires_cuda


def test_wise_ffn_captures_in_a_cuda_graph():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 16, 64, generator=g).cuda()
    w_main = torch.randn(96, 64, generator=g).cuda() * 0.1
    w_sides = (w_main + 0.1 * torch.randn(2, 96, 64, generator=g).cuda()).contiguous()
    thr = torch.zeros(2, device="cuda")
    eager = wise_ext.wise_ffn(a, w_main, w_sides, None, thr)
    static_a = a.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        wise_ext.wise_ffn(static_a, w_main, w_sides, None, thr)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = wise_ext.wise_ffn(static_a, w_main, w_sides, None, thr)
    static_a.copy_(a * 2)
    graph.replay()
    fresh = wise_ext.wise_ffn(a * 2, w_main, w_sides, None, thr)
    assert torch.equal(captured.out, fresh.out) and torch.equal(captured.choice, fresh.choice)
    assert not torch.equal(captured.out, eager.out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [2, 9])
def test_ties_merge_matches_cpu_kernel_on_unaligned_views(dtype, k):
    g = torch.Generator().manual_seed(k)
    flat = torch.randn(k + 1, 30011, generator=g)
    flat[1:] = flat[0] + flat[1:] * (torch.rand(k, 30011, generator=g) < 0.4)
    gpu = flat.to(dtype).cuda()
    # Offsets of one element break 16-byte alignment; the kernels must fall back, not misread.
    base, tensors = gpu[0, 1:], [gpu[i, 1:] for i in range(1, k + 1)]
    weights = [1.0 / k] * k
    for args in [(0.3, "magnitude", "sum"), (0.3, "rescaled_random", "sum"), (1.0, "none", "none")]:
        out = wise_ext.ties_merge(base, tensors, weights, *args)
        cpu = wise_ext.ties_merge(base.cpu(), [t.cpu() for t in tensors], weights, *args)
        assert torch.equal(out.cpu(), cpu)


@pytest.mark.parametrize("dense", [False, True])
def test_ties_merge_large_matches_reference(dense):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1024, 2753, generator=g)
    mask = torch.ones_like(base) if dense else (torch.rand(1024, 2753, generator=g) < 0.2).float()
    tensors = [base + torch.randn(1024, 2753, generator=g) * mask for _ in range(4)]
    out = wise_ext.ties_merge(base.cuda(), [t.cuda() for t in tensors], [0.25] * 4, 0.53)
    assert torch.equal(out.cpu(), ref.ties_merge(base, tensors, [0.25] * 4, 0.53))


def test_mixed_cpu_and_cuda_inputs_are_refused():
    a = torch.randn(2, 3, 8)
    w = torch.randn(5, 8)
    with pytest.raises(ValueError, match="wise_ffn: a is on cpu"):
        wise_ext.wise_ffn(a, w.cuda(), w.cuda().unsqueeze(0), None, torch.zeros(1, device="cuda"))
    with pytest.raises(ValueError, match="ties_merge: tensors\\[1\\] is on cpu"):
        wise_ext.ties_merge(w.cuda(), [w.cuda(), w], [1.0, 1.0], 0.5)
    with pytest.raises(ValueError, match="sharded_sgd_step_: grad is on cpu"):
        wise_ext.sharded_sgd_step_(w.cuda(), w, w.cuda(), 0.1, 0.0, 0.5, 0, 1.0)
    with pytest.raises(ValueError, match="routing_distance: y_side is on cpu"):
        wise_ext.routing_distance(w.cuda(), w)


def test_routing_distance_backward_matches_cpu():
    g = torch.Generator().manual_seed(2)
    ym, ys = torch.randn(33, 129, generator=g), torch.randn(33, 129, generator=g)
    for act in wise_ext.ops.ACTIVATIONS:
        grads = []
        for dev in ("cpu", "cuda"):
            a, b = ym.to(dev).requires_grad_(), ys.to(dev).requires_grad_()
            wise_ext.routing_distance(a, b, act).sum().backward()
            grads.append((a.grad.cpu(), b.grad.cpu()))
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
