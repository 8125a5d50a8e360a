"""Build kdops._C: the op schemas and C++ CPU kernels, plus CUDA sources when asked.

CUDA sources (csrc/cuda/*.cu) are compiled when a GPU is visible or FORCE_CUDA=1.
CUDA_HOME must point at a real toolkit (see docs/environment.md; the Makefile sets it).
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension, CUDA_HOME

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fno-trapping-math changes no value (no reassociation, no finite-math assumptions); without it
    # GCC 12 will not if-convert the selects (clamps, sign picks) of the kernels' elementwise loops
    # for SSE/AVX2 targets, and those loops stay scalar there (only AVX-512 masks them).
    cxx = ["-O3", "-fno-trapping-math", "-fopenmp", "-DKDOPS_WITH_OPENMP"]
    link = ["-fopenmp"]
    if os.environ.get("KDOPS_SANITIZE", "0") == "1":
        # AddressSanitizer + UBSan build of the C++ kernels (tests/sanitize.sh runs the
        # hostile-input fuzz and the CPU op tests against it); never for a normal install.
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g"]
        # Python's CFLAGS carry -fwrapv; without it UBSan also reports signed integer overflow.
        # float-cast-overflow (not part of "undefined" in GCC): a NaN or out-of-range float cast
        # to an integer, whose result differs between x86 and aarch64.
        cxx_extra = ["-fno-wrapv", "-fsanitize=float-cast-overflow"]
        cxx = ["-O1", "-fno-trapping-math", "-fopenmp", "-DKDOPS_WITH_OPENMP"] + san + cxx_extra
        link = link + san
    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    with_cuda = (force_cuda or torch.cuda.is_available()) and CUDA_HOME is not None
    if force_cuda and CUDA_HOME is None:
        raise RuntimeError(
            "FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the toolkit root "
            "(the folder holding bin/nvcc)."
        )
    if with_cuda:
        cu = sorted(glob.glob("csrc/cuda/*.cu"))
        return [
            CUDAExtension(
                "kdops._C",
                sources + cu,
                extra_compile_args={
                    "cxx": cxx + ["-DKDOPS_WITH_CUDA"],
                    "nvcc": ["-O3", "--use_fast_math", "-DKDOPS_WITH_CUDA", "-lineinfo"],
                },
                extra_link_args=link,
            )
        ]
    return [CppExtension("kdops._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(ext_modules=_extensions(), cmdclass=_cmdclass())
