import pytest
import torch
from torch.library import opcheck

import wise_ext
from wise_ext import reference as ref

from conftest import noncontiguous_copy, randn

SPARSIFY = ["magnitude", "random", "rescaled_random", "none"]
CONSENSUS = ["sum", "count", "none"]


def make_inputs(shape, k, gen, dtype, device, frac=0.3, noncontiguous=False):
    base = randn(shape, gen, dtype, device, noncontiguous)
    tensors = []
    for _ in range(k):
        touched = (torch.rand(shape, generator=gen) < frac).to(device)
        delta = randn(shape, gen, torch.float32, device) * touched
        t = (base.float() + delta).to(dtype)
        tensors.append(noncontiguous_copy(t) if noncontiguous else t)
    weights = (torch.rand(k, generator=gen) + 0.25).tolist()
    return base, tensors, weights


def run_both(base, tensors, weights, *args):
    out = wise_ext.ties_merge(base, tensors, weights, *args)
    expected = ref.ties_merge(base.cpu(), [t.cpu() for t in tensors], weights, *args)
    return out, expected


@pytest.mark.parametrize("sparsify", SPARSIFY)
@pytest.mark.parametrize("consensus", CONSENSUS)
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_reference_every_method(sparsify, consensus, normalize, device, dtype, gen):
    base, tensors, weights = make_inputs((37, 53), 3, gen, dtype, device)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    out, expected = run_both(base, tensors, weights, 0.35, sparsify, consensus, normalize, seed)
    assert out.dtype == dtype and out.shape == base.shape and out.device == base.device
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("k", range(1, 11))  # past 8 the CUDA merge takes its generic path
@pytest.mark.parametrize("density", [1e-3, 0.2, 0.53, 0.999, 1.0])
def test_magnitude_k_and_density(k, density, device, gen):
    base, tensors, weights = make_inputs((3, 11, 17), k, gen, torch.float32, device, frac=0.6)
    out, expected = run_both(base, tensors, weights, density)
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("frac", [0.2, 1.0])
def test_large_tensor_uses_both_radix_passes(frac, device, dtype, gen):
    # Dense deltas need the second radix pass; sparse ones stop after the first.
    base, tensors, weights = make_inputs((301, 1009), 4, gen, dtype, device, frac=frac)
    out, expected = run_both(base, tensors, weights, 0.37)
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=0)


def test_noncontiguous_inputs(device, dtype, gen):
    base, tensors, weights = make_inputs((29, 31), 3, gen, dtype, device, noncontiguous=True)
    assert not base.is_contiguous() and not tensors[0].is_contiguous()
    out, expected = run_both(base, tensors, weights, 0.5)
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=0)


def test_exact_magnitude_ties_are_all_kept(device, gen):
    # Deltas from a handful of values: many entries tie at the threshold.
    shape = (41, 43)
    base = randn(shape, gen, device=device)
    levels = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    tensors = [base + levels[torch.randint(0, 5, shape, generator=gen)].to(device) for _ in range(3)]
    out, expected = run_both(base, tensors, [1.0, 1.0, 1.0], 0.3)
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=0)
    # Every entry with |delta| at the threshold survives: the kept count is >= int(density * numel).
    only = wise_ext.ties_merge(base, tensors[:1], [1.0], 0.3)
    kept = int(((only - base) != 0).sum())
    assert kept >= int(0.3 * base.numel())
    assert kept == int(((tensors[0] - base).abs() >= 1.0).sum())


def test_all_zero_deltas_return_base(device, dtype, gen):
    base = randn((17, 19), gen, dtype, device)
    for sparsify in SPARSIFY:
        out = wise_ext.ties_merge(base, [base.clone(), base.clone()], [0.5, 0.5], 0.4, sparsify)
        assert torch.equal(out, base)


def test_hand_computed_ties():
    base = torch.zeros(3)
    t1 = torch.tensor([1.0, -2.0, 3.0])
    t2 = torch.tensor([-1.0, -1.0, 1.0])
    # entry 0: the weighted sum 0 elects +, only t1 agrees; entries 1 and 2 average both.
    out = wise_ext.ties_merge(base, [t1, t2], [1.0, 1.0], 1.0)
    assert out.tolist() == [1.0, -1.5, 2.0]
    # weights move the election: t2 outweighs t1 at entry 0.
    out = wise_ext.ties_merge(base, [t1, t2], [1.0, 3.0], 1.0)
    assert out[0].item() == -1.0


def test_linear_merge_is_weighted_mean(gen):
    base, tensors, weights = make_inputs((13, 7), 4, gen, torch.float32, "cpu", frac=1.0)
    out = wise_ext.ties_merge(base, tensors, weights, 1.0, "none", "none")
    expected = sum(w * t for w, t in zip(weights, tensors)) / sum(weights)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_random_sparsify_is_seeded(device, gen):
    base, tensors, weights = make_inputs((64, 65), 2, gen, torch.float32, device, frac=1.0)
    a = wise_ext.ties_merge(base, tensors, weights, 0.3, "random", seed=7)
    b = wise_ext.ties_merge(base, tensors, weights, 0.3, "random", seed=7)
    c = wise_ext.ties_merge(base, tensors, weights, 0.3, "random", seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # About density * numel entries of a single tensor survive.
    single = wise_ext.ties_merge(base, tensors[:1], [1.0], 0.3, "random", seed=7)
    frac = ((single - base) != 0).float().mean().item()
    assert abs(frac - 0.3) < 0.03


def test_weights_may_be_a_tensor(gen):
    base, tensors, weights = make_inputs((5, 6), 2, gen, torch.float32, "cpu")
    a = wise_ext.ties_merge(base, tensors, torch.tensor(weights), 0.5)
    assert torch.equal(a, wise_ext.ties_merge(base, tensors, weights, 0.5))


@pytest.mark.parametrize("sparsify", SPARSIFY)
def test_opcheck(sparsify, device, gen):
    base, tensors, weights = make_inputs((9, 10), 3, gen, torch.float32, device)
    opcheck(torch.ops.wise_ext.ties_merge, (base, tensors, weights, 0.4, sparsify, "sum", True, 3))


def test_compiles_with_torch_compile(gen):
    base, tensors, weights = make_inputs((9, 10), 2, gen, torch.float32, "cpu")

    @torch.compile(backend="aot_eager", fullgraph=True)
    def merge(b, t0, t1):
        return wise_ext.ties_merge(b, [t0, t1], weights, 0.5) * 2

    torch.testing.assert_close(merge(base, *tensors), 2 * wise_ext.ties_merge(base, tensors, weights, 0.5))


BAD = [
    (lambda b, t: (b, [t[0], t[1][:-1]], [1.0, 1.0], 0.5), "tensors\\[1\\] has shape"),
    (lambda b, t: (b.int(), [x.int() for x in t], [1.0, 1.0], 0.5), "base must be float32"),
    (lambda b, t: (b, [t[0], t[1].double()], [1.0, 1.0], 0.5), "tensors\\[1\\] has dtype"),
    (lambda b, t: (b, t, [1.0], 0.5), "weights has 1 entries"),
    (lambda b, t: (b, t, [1.0, float("nan")], 0.5), "weights\\[1\\] must be finite"),
    (lambda b, t: (b, t, [1.0, 1.0], 0.0), "density must be in \\(0, 1\\]"),
    (lambda b, t: (b, t, [1.0, 1.0], 1.5), "density must be in \\(0, 1\\]"),
    (lambda b, t: (b, [], [], 0.5), "tensors is empty"),
    (lambda b, t: (b[:0], [x[:0] for x in t], [1.0, 1.0], 0.5), "base is empty"),
    (lambda b, t: (b, t, [1.0, 1.0], 0.5, "topk"), "sparsify must be one of"),
    (lambda b, t: (b, t, [1.0, 1.0], 0.5, "magnitude", "vote"), "consensus must be one of"),
]


@pytest.mark.parametrize("make,message", BAD)
def test_bad_inputs_name_the_argument(make, message, gen):
    base, tensors, _ = make_inputs((6, 7), 2, gen, torch.float32, "cpu")
    with pytest.raises((ValueError, TypeError, RuntimeError), match="ties_merge: " + message):
        wise_ext.ties_merge(*make(base, tensors))


def test_mixed_devices_are_refused(gen):
    base, tensors, _ = make_inputs((6, 7), 2, gen, torch.float32, "cpu")
    with pytest.raises(ValueError, match="tensors\\[1\\] is on cpu, expected meta"):
        wise_ext.ties_merge(base.to("meta"), [tensors[0].to("meta"), tensors[1]], [1.0, 1.0], 0.5)
