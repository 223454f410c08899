"""The CMake-built operator library loads into a plain PyTorch process and computes
what the reference says. CI builds it and sets WISE_EXT_CMAKE_LIBRARY."""
import os
import subprocess
import sys

import pytest

LIB = os.environ.get("WISE_EXT_CMAKE_LIBRARY")
REFERENCE = os.path.join(os.path.dirname(__file__), "..", "wise_ext", "reference.py")


@pytest.mark.skipif(not LIB, reason="set WISE_EXT_CMAKE_LIBRARY to the CMake-built libwise_ext_ops.so")
def test_cmake_library_registers_the_operators():
    code = f"""
import importlib.util, sys, torch
torch.ops.load_library({LIB!r})
# The reference is plain torch; loading it by path keeps the wise_ext package (and its _C) out of this process.
spec = importlib.util.spec_from_file_location("wise_reference", {REFERENCE!r})
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)
assert 'wise_ext._C' not in sys.modules
g = torch.Generator().manual_seed(0)
base = torch.randn(17, 23, generator=g)
ts = [base + torch.randn(17, 23, generator=g) for _ in range(3)]
out = torch.ops.wise_ext.ties_merge(base, ts, [1.0, 0.5, 2.0], 0.4, "magnitude", "sum", True, 0)
assert torch.equal(out, ref.ties_merge(base, ts, [1.0, 0.5, 2.0], 0.4))
mask = torch.ops.wise_ext.shard_mask([5, 7], 0.3, 9)
assert torch.equal(mask, ref.shard_mask((5, 7), 0.3, 9))
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
