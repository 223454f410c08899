import math

import pytest
import torch
from torch.library import opcheck

import wise_ext
from wise_ext import reference as ref

from conftest import noncontiguous_copy, randn, requires_cuda


def step_inputs(shape, gen, dtype, device, noncontiguous=False):
    w0 = randn(shape, gen, dtype, device, noncontiguous)
    w = (w0.float() + 0.01 * randn(shape, gen, torch.float32, device)).to(dtype)
    if noncontiguous:
        w = noncontiguous_copy(w)
    return w, randn(shape, gen, dtype, device), w0


@pytest.mark.parametrize("noncontiguous", [False, True])
@pytest.mark.parametrize("shape", [(5,), (7, 13), (3, 37, 41)])
def test_matches_reference(shape, noncontiguous, device, dtype, gen):
    w, grad, w0 = step_inputs(shape, gen, dtype, device, noncontiguous)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    expected = ref.sharded_sgd_step(w.cpu(), grad.cpu(), w0.cpu(), 0.3, 0.05, 0.4, seed, 0.02)
    before = w.data_ptr()
    wise_ext.sharded_sgd_step_(w, grad, w0, 0.3, 0.05, 0.4, seed, 0.02)
    assert w.data_ptr() == before
    torch.testing.assert_close(w.cpu(), expected, rtol=0, atol=0)


def test_only_the_shard_moves_and_stays_bounded(device, gen):
    w, grad, w0 = step_inputs((64, 129), gen, torch.float32, device)
    original = w.clone()
    wise_ext.sharded_sgd_step_(w, grad * 100, w0, 1.0, 0.1, 0.25, 5, 0.01)
    mask = wise_ext.shard_mask(w.shape, 0.25, 5, device=device)
    assert torch.equal(w[~mask], original[~mask])  # bit for bit outside the shard
    bound = torch.tensor(0.01)  # the clamp is to [w0 - c, w0 + c] as computed in fp32
    assert ((w >= w0 - bound) & (w <= w0 + bound))[mask].all()
    assert (w[mask] != original[mask]).float().mean() > 0.9


def test_unbounded_step_is_plain_sgd(gen):
    w, grad, w0 = step_inputs((20, 30), gen, torch.float32, "cpu")
    expected = w - 0.1 * (grad + 0.01 * w)
    wise_ext.sharded_sgd_step_(w, grad, w0, 0.1, 0.01, 1.0, 0, math.inf)
    torch.testing.assert_close(w, expected, rtol=1e-6, atol=1e-7)


def test_shard_mask_matches_reference_and_ratio(device, gen):
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    mask = wise_ext.shard_mask((301, 207), 0.2, seed, device=device)
    assert mask.dtype == torch.bool and mask.device.type == device.type
    assert torch.equal(mask.cpu(), ref.shard_mask((301, 207), 0.2, seed))
    n = mask.numel()
    assert abs(mask.float().mean().item() - 0.2) < 5 * math.sqrt(0.2 * 0.8 / n)


def test_shard_mask_seeds():
    a = wise_ext.shard_mask((50, 51), 0.5, 1)
    assert torch.equal(a, wise_ext.shard_mask((50, 51), 0.5, 1))
    assert not torch.equal(a, wise_ext.shard_mask((50, 51), 0.5, 2))
    assert wise_ext.shard_mask((9,), 1.0, 3).all()


def test_philox_known_answers():
    # Known-answer vectors of Philox4x32-10 published with Random123 (Salmon et al., 2011).
    def words(ctr, key):
        return [int(x) for x in ref.philox4x32_10([torch.tensor([c]) for c in ctr], key)]

    assert words([0, 0, 0, 0], (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    m = 0xFFFFFFFF
    assert words([m, m, m, m], (m, m)) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


@requires_cuda
def test_cpu_and_cuda_draw_the_same_masks():
    for seed in (0, 1, 2**40 + 3):
        cpu = wise_ext.shard_mask((123, 457), 0.3, seed)
        assert torch.equal(cpu, wise_ext.shard_mask((123, 457), 0.3, seed, device="cuda").cpu())
        w, g, w0 = (torch.randn(123, 457) for _ in range(3))
        wc = w.cuda()
        wise_ext.sharded_sgd_step_(w, g, w0, 0.1, 0.01, 0.3, seed, 0.5)
        wise_ext.sharded_sgd_step_(wc, g.cuda(), w0.cuda(), 0.1, 0.01, 0.3, seed, 0.5)
        assert torch.equal(w, wc.cpu())


def test_opcheck(device, gen):
    w, grad, w0 = step_inputs((9, 10), gen, torch.float32, device)
    opcheck(torch.ops.wise_ext.sharded_sgd_step_, (w, grad, w0, 0.1, 0.0, 0.5, 3, 0.1))
    opcheck(torch.ops.wise_ext.shard_mask, ([4, 5], 0.5, 3, device))


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(grad=lambda t: t[:-1]), "grad has shape"),
        (dict(w0=lambda t: t.half()), "w0 has dtype"),
        (dict(w=lambda t: t.int(), grad=lambda t: t.int(), w0=lambda t: t.int()), "w must be float32"),
        (dict(w=lambda t: t[:0], grad=lambda t: t[:0], w0=lambda t: t[:0]), "w is empty"),
        (dict(lr=float("nan")), "lr must be finite"),
        (dict(mask_ratio=0.0), "mask_ratio must be in"),
        (dict(mask_ratio=1.5), "mask_ratio must be in"),
        (dict(norm_constraint=-1.0), "norm_constraint must be >= 0"),
    ],
)
def test_bad_inputs_name_the_argument(change, message, gen):
    w, grad, w0 = step_inputs((4, 6), gen, torch.float32, "cpu")
    args = dict(w=w, grad=grad, w0=w0, lr=0.1, weight_decay=0.0, mask_ratio=0.5, seed=0, norm_constraint=1.0)
    for key, value in change.items():
        args[key] = value(args[key]) if callable(value) else value
    before = w.clone()
    with pytest.raises((ValueError, TypeError), match="sharded_sgd_step_: " + message):
        wise_ext.sharded_sgd_step_(**args)
    assert torch.equal(w, before)


def test_shard_mask_rejects_bad_ratio():
    with pytest.raises(ValueError, match="shard_mask: mask_ratio must be in"):
        wise_ext.shard_mask((3, 3), 0.0, 1)
