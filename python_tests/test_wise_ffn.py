import pytest
import torch
from torch.library import opcheck

import wise_ext
from wise_ext import reference as ref
from wise_ext.ops import ACTIVATIONS

from conftest import randn


def layer_inputs(gen, dtype, device, batch=4, tokens=9, hidden=24, out=19, memories=2, transpose=False,
                 bias=True, noncontiguous=False):
    a = randn((batch, tokens, hidden), gen, dtype, device, noncontiguous)
    shape = (hidden, out) if transpose else (out, hidden)
    w_main = randn(shape, gen, dtype, device) * 0.2
    # Side memories differ from the main one in a few rows/cols, by amounts that vary per memory.
    w_sides = torch.stack([w_main + (m + 1) * 0.05 * randn(shape, gen, dtype, device) for m in range(memories)])
    b = randn((out,), gen, dtype, device) if bias else None
    return a, w_main, w_sides, b


def separating_thresholds(scores):
    """Per memory, the midpoint of the widest gap between sorted sequence scores, so rounding never flips
    a decision, and both outcomes occur."""
    thr = []
    for col in scores.T:
        s = torch.sort(col.float()).values
        if len(s) == 1:
            thr.append(float(s[0]) * 0.5)
            continue
        gaps = s[1:] - s[:-1]
        i = int(torch.argmax(gaps))
        thr.append(float(s[i] + s[i + 1]) / 2)
    return torch.tensor(thr)


def check_against_reference(a, w_main, w_sides, bias, mask, reduce, act, transpose, dtype, select="score"):
    expected = ref.wise_ffn(a.cpu(), w_main.cpu(), w_sides.cpu(), None if bias is None else bias.cpu(),
                            torch.full((w_sides.shape[0],), -1.0), None if mask is None else mask.cpu(),
                            reduce, act, transpose)
    thr = separating_thresholds(expected[1]).to(a.device)
    expected = ref.wise_ffn(a.cpu(), w_main.cpu(), w_sides.cpu(), None if bias is None else bias.cpu(), thr.cpu(),
                            None if mask is None else mask.cpu(), reduce, act, transpose, select)
    out, scores, choice = wise_ext.wise_ffn(a, w_main, w_sides, bias, thr, mask, reduce, act, transpose, select)
    assert out.dtype == dtype and scores.dtype == torch.float32 and choice.dtype == torch.long
    assert torch.equal(choice.cpu(), expected[2])
    assert (choice >= 0).any() or w_sides.shape[0] == 0
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(scores.cpu(), expected[1], rtol=tol, atol=tol)
    torch.testing.assert_close(out.cpu(), expected[0], rtol=tol, atol=tol)
    return choice


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("reduce", ["mean", "max"])
@pytest.mark.parametrize("transpose", [False, True])
def test_matches_reference(act, reduce, transpose, device, dtype, gen):
    a, w_main, w_sides, bias = layer_inputs(gen, dtype, device, transpose=transpose)
    check_against_reference(a, w_main, w_sides, bias, None, reduce, act, transpose, dtype)


@pytest.mark.parametrize("memories", [1, 3])
def test_padding_mask_noncontiguous_and_no_bias(memories, device, dtype, gen):
    a, w_main, w_sides, _ = layer_inputs(gen, dtype, device, batch=5, tokens=7, hidden=33, out=17,
                                         memories=memories, bias=False, noncontiguous=True)
    mask = torch.ones(5, 7, dtype=torch.long)
    for b, pad in enumerate([0, 2, 6, 1, 3]):
        mask[b, :pad] = 0  # left padding, as generate() uses it
    check_against_reference(a, w_main, w_sides, None, mask.to(device), "mean", "silu", False, dtype)


@pytest.mark.parametrize("transpose", [False, True])
def test_latest_select_matches_reference(transpose, device, dtype, gen):
    a, w_main, w_sides, bias = layer_inputs(gen, dtype, device, batch=7, tokens=5, hidden=21, out=13, memories=3,
                                            transpose=transpose, noncontiguous=True)
    check_against_reference(a, w_main, w_sides, bias, None, "mean", "none", transpose, dtype, "latest")


def test_latest_select_picks_the_newest_memory_over_its_threshold(device, gen):
    # Memory 0 moves the output three times as far as memory 1 on every input: it has the higher score.
    hidden, out = 16, 12
    w_main = randn((out, hidden), gen, device=device)
    delta = randn((out, hidden), gen, device=device)
    w_sides = torch.stack([w_main + 3 * delta, w_main + delta])
    a = randn((1, 4, hidden), gen, device=device)
    _, scores, _ = wise_ext.wise_ffn(a, w_main, w_sides, None, [1e9, 1e9])
    s0, s1 = scores[0].tolist()
    assert s0 > s1 > 0
    both = [s1 / 2, s1 / 2]
    assert wise_ext.wise_ffn(a, w_main, w_sides, None, both).choice.item() == 0
    y = wise_ext.wise_ffn(a, w_main, w_sides, None, both, select="latest")
    assert y.choice.item() == 1
    torch.testing.assert_close(y.out, torch.nn.functional.linear(a, w_sides[1]))
    assert wise_ext.wise_ffn(a, w_main, w_sides, None, [s1 / 2, s1 * 2], select="latest").choice.item() == 0
    assert wise_ext.wise_ffn(a, w_main, w_sides, None, [s0 * 2, s1 * 2], select="latest").choice.item() == -1


def test_auto_reduce_switches_to_max_after_100_tokens(device, gen):
    a, w_main, w_sides, bias = layer_inputs(gen, torch.float32, device, batch=2, tokens=120, memories=1)
    mask = torch.ones(2, 120, dtype=torch.bool, device=device)
    mask[1, 30:] = False  # 30 real tokens: mean; 120: max
    _, auto, _ = wise_ext.wise_ffn(a, w_main, w_sides, bias, [1e9], mask, "auto")
    _, mean, _ = wise_ext.wise_ffn(a, w_main, w_sides, bias, [1e9], mask, "mean")
    _, mx, _ = wise_ext.wise_ffn(a, w_main, w_sides, bias, [1e9], mask, "max")
    assert auto[0] == mx[0] and auto[1] == mean[1] and mx[0] > mean[0]


def test_each_sequence_routes_on_its_own(device, gen):
    # Sequence 0 sees activations that move the side memory far from the main one; sequence 1 does not.
    hidden, out = 16, 12
    w_main = randn((out, hidden), gen, device=device)
    w_side = w_main.clone()
    w_side[:, :4] += 3.0
    a = randn((2, 5, hidden), gen, device=device)
    a[1, :, :4] = 0.0
    y, scores, choice = wise_ext.wise_ffn(a, w_main, w_side, None, [1.0])
    assert choice.tolist() == [0, -1]
    assert torch.equal(y[1], torch.nn.functional.linear(a[1:], w_main)[0])
    torch.testing.assert_close(y[0], torch.nn.functional.linear(a[:1], w_side)[0])
    for b in range(2):  # the same answer as alone in a batch of one
        alone = wise_ext.wise_ffn(a[b:b + 1], w_main, w_side, None, [1.0])
        assert torch.equal(alone.out[0], y[b]) and alone.choice.item() == choice[b].item()


def test_main_route_is_exactly_the_unedited_layer(gen):
    from transformers.pytorch_utils import Conv1D

    lin = torch.nn.Linear(24, 19)
    conv = Conv1D(19, 24)
    torch.nn.init.normal_(conv.bias)
    a = randn((3, 6, 24), gen)
    for layer, weight, transpose in ((lin, lin.weight, False), (conv, conv.weight, True)):
        with torch.no_grad():
            y = wise_ext.wise_ffn(a, weight, weight.unsqueeze(0) * 1.5, layer.bias, [float("inf")],
                                  transpose=transpose)
            assert (y.choice == -1).all()
            assert torch.equal(y.out, layer(a))


def test_two_dimensional_input(gen):
    a, w_main, w_sides, bias = layer_inputs(gen, torch.float32, "cpu", batch=1)
    y2 = wise_ext.wise_ffn(a[0], w_main, w_sides[0], bias, 0.0)
    y3 = wise_ext.wise_ffn(a, w_main, w_sides[:1], bias, torch.zeros(1))
    assert y2.out.shape == a[0].shape[:-1] + (w_main.shape[0],)
    assert torch.equal(y2.out, y3.out[0]) and torch.equal(y2.choice, y3.choice)


@pytest.mark.parametrize("select", ["score", "latest"])
@pytest.mark.parametrize("transpose", [False, True])
def test_opcheck(transpose, select, device, gen):
    a, w_main, w_sides, bias = layer_inputs(gen, torch.float32, device, transpose=transpose)
    mask = torch.ones(a.shape[:2], dtype=torch.bool, device=device)
    thr = torch.zeros(w_sides.shape[0], device=device)
    opcheck(torch.ops.wise_ext.wise_ffn, (a, w_main, w_sides, bias, thr, mask, "mean", "gelu", transpose, select))


def test_compiles_with_torch_compile(gen):
    a, w_main, w_sides, bias = layer_inputs(gen, torch.float32, "cpu")
    thr = torch.zeros(2)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def layer(x):
        return wise_ext.wise_ffn(x, w_main, w_sides, bias, thr, None, "mean", "silu").out + 1

    torch.testing.assert_close(layer(a), wise_ext.wise_ffn(a, w_main, w_sides, bias, thr, None, "mean", "silu").out + 1)


BAD = [
    (lambda a, wm, ws, b, t, m: (a[0, 0], wm, ws, b, t, m), "a must be \\(batch, tokens, in_features\\)"),
    (lambda a, wm, ws, b, t, m: (a.int(), wm, ws, b, t, m), "a must be float32"),
    (lambda a, wm, ws, b, t, m: (a[:, :0], wm, ws, b, t, m[:, :0]), "a is empty"),
    (lambda a, wm, ws, b, t, m: (a, wm[:, :-1], ws, b, t, m), "w_main has shape"),
    (lambda a, wm, ws, b, t, m: (a, wm.double(), ws, b, t, m), "w_main has dtype"),
    (lambda a, wm, ws, b, t, m: (a, wm, ws[:, :-1], b, t, m), "w_sides has shape"),
    (lambda a, wm, ws, b, t, m: (a, wm, ws, b[:-1], t, m), "bias has shape"),
    (lambda a, wm, ws, b, t, m: (a, wm, ws, b, t[:1], m), "thresholds has shape"),
    (lambda a, wm, ws, b, t, m: (a, wm, ws, b, t, m[:, :-1]), "token_mask has shape"),
    (lambda a, wm, ws, b, t, m: (a, wm, ws, b, t, m.float()), "token_mask must be bool or integer"),
    (lambda a, wm, ws, b, t, m: (a, wm, ws, b, t, m, "median"), "reduce must be one of"),
    (lambda a, wm, ws, b, t, m: (a, wm, ws, b, t, m, "mean", "tanh"), "act must be one of"),
    (lambda a, wm, ws, b, t, m: (a, wm, ws, b, t, m, "mean", "none", False, "best"), "select must be score or latest"),
    (lambda a, wm, ws, b, t, m: (a, wm.to("meta"), ws, b, t, m), "w_main is on meta"),
]


@pytest.mark.parametrize("make,message", BAD)
def test_bad_inputs_name_the_argument(make, message, gen):
    a, w_main, w_sides, bias = layer_inputs(gen, torch.float32, "cpu")
    mask = torch.ones(a.shape[:2], dtype=torch.bool)
    with pytest.raises((ValueError, TypeError), match="wise_ffn: " + message):
        torch.ops.wise_ext.wise_ffn(*make(a, w_main, w_sides, bias, torch.zeros(2), mask))
