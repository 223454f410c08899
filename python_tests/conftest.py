import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request):
    return request.param


@pytest.fixture
def gen():
    """A fresh, differently seeded generator per test: inputs are new on every run."""
    g = torch.Generator()
    g.seed()
    return g


def noncontiguous_copy(t):
    """The same values in a non-contiguous layout: a transposed copy, or every other element in 1-D."""
    if t.dim() >= 2:
        out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    else:
        out = torch.empty(2 * t.numel(), dtype=t.dtype, device=t.device)[::2].copy_(t)
    assert not out.is_contiguous() and torch.equal(out, t)
    return out


def randn(shape, gen, dtype=torch.float32, device="cpu", noncontiguous=False):
    t = torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)
    return noncontiguous_copy(t) if noncontiguous else t
