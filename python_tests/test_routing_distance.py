import pytest
import torch
from torch.library import opcheck

import wise_ext
from wise_ext import reference as ref
from wise_ext.ops import ACTIVATIONS

from conftest import randn

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5, torch.float64: 1e-12}


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_matches_reference(act, noncontiguous, device, dtype, gen):
    ym = randn((5, 7, 33), gen, dtype, device, noncontiguous)
    ys = randn((5, 7, 33), gen, dtype, device, noncontiguous)
    d = wise_ext.routing_distance(ym, ys, act)
    expected = ref.routing_distance(ym, ys, act)
    assert d.dtype == torch.float32 and d.shape == (5, 7)
    # Both read the same rounded inputs and accumulate in fp32.
    torch.testing.assert_close(d, expected, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_backward_matches_reference(act, device, dtype, gen):
    ym = randn((6, 45), gen, dtype, device).requires_grad_()
    ys = randn((6, 45), gen, dtype, device).requires_grad_()
    upstream = randn((6,), gen, torch.float32, device)
    grads = torch.autograd.grad((wise_ext.routing_distance(ym, ys, act) * upstream).sum(), (ym, ys))
    expected = torch.autograd.grad((ref.routing_distance(ym, ys, act) * upstream).sum(), (ym, ys))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for g, e in zip(grads, expected):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), e.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gradcheck(act, device, gen):
    ym = randn((4, 9), gen, torch.float64, device).requires_grad_()
    ys = randn((4, 9), gen, torch.float64, device).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: wise_ext.routing_distance(a, b, act), (ym, ys))


def test_equal_memories_give_zero_distance_and_zero_gradient(device, gen):
    y = randn((3, 8), gen, torch.float32, device)
    ym, ys = y.clone().requires_grad_(), y.clone().requires_grad_()
    d = wise_ext.routing_distance(ym, ys, "silu")
    assert torch.equal(d, torch.zeros_like(d))
    d.sum().backward()
    assert torch.equal(ym.grad, torch.zeros_like(y)) and torch.equal(ys.grad, torch.zeros_like(y))


@pytest.mark.parametrize("act", ["none", "gelu_tanh"])
def test_opcheck(act, device, gen):
    ym = randn((3, 4, 10), gen, torch.float32, device).requires_grad_()
    ys = randn((3, 4, 10), gen, torch.float32, device).requires_grad_()
    opcheck(torch.ops.wise_ext.routing_distance, (ym, ys, act))
    d = wise_ext.routing_distance(ym, ys, act).detach()
    opcheck(torch.ops.wise_ext.routing_distance_backward, (torch.ones_like(d), ym.detach(), ys.detach(), d, act))


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda a, b: (a, b[:, :-1]), "y_side has shape"),
        (lambda a, b: (a.int(), b.int()), "y_main must be float32"),
        (lambda a, b: (a, b.half()), "y_side has dtype"),
        (lambda a, b: (a[:0], b[:0]), "y_main is empty"),
        (lambda a, b: (a, b, "tanh"), "act must be one of"),
        (lambda a, b: (a.to("meta"), b), "y_side is on cpu"),
    ],
)
def test_bad_inputs_name_the_argument(make, message, gen):
    a, b = randn((3, 5), gen), randn((3, 5), gen)
    with pytest.raises((ValueError, TypeError), match="routing_distance: " + message):
        wise_ext.routing_distance(*make(a, b))
