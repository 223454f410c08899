"""Builds wise_ext._C: the C++ operators always, the CUDA kernels when torch has CUDA.

WISE_EXT_CUDA=0|1 forces the CUDA part off or on; TORCH_CUDA_ARCH_LIST picks the
GPU architectures (sm_80 and sm_90 when unset). Install with
``pip install --no-build-isolation -e .`` so the build uses the torch you have.
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_wanted() -> bool:
    flag = os.environ.get("WISE_EXT_CUDA")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "1" and not available:
        raise RuntimeError(
            "WISE_EXT_CUDA=1 but the installed torch has no CUDA "
            f"(torch.version.cuda={torch.version.cuda}) or nvcc was not found (CUDA_HOME={CUDA_HOME})"
        )
    return available if flag is None else flag == "1"


def extension():
    def rel(pattern):
        return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))

    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    # -fno-trapping-math lets GCC vectorise the branch-free selects of the merge (no FP exception is read).
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-DWISE_EXT_PYTHON_MODULE"]
    kwargs = dict(
        name="wise_ext._C",
        include_dirs=[os.path.join(HERE, "csrc", "include")],
        extra_link_args=["-fopenmp"],
    )
    if cuda_wanted():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
        nvcc = ["-O3", "-std=c++17", "-lineinfo"]
        return CUDAExtension(sources=sources, extra_compile_args={"cxx": cxx + ["-DWISE_EXT_CUDA"], "nvcc": nvcc}, **kwargs)
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    packages=find_packages(include=["wise_ext", "wise_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
