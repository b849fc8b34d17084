"""Build xlkernels._C: CPU C++ kernels always; CUDA kernels when torch is a CUDA build and nvcc is found.

XLKERNELS_BUILD_CUDA=0|1 overrides the CUDA decision. The C++ standard is torch's default (C++20 from torch 2.14
on, whose headers need it).
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _want_cuda() -> bool:
    env = os.environ.get("XLKERNELS_BUILD_CUDA")
    if env is not None:
        return env == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    cxx = ["-O3", "-fopenmp", "-DAT_PER_OPERATOR_HEADERS"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not _want_cuda():
        return CppExtension("xlkernels._C", sources, extra_compile_args={"cxx": cxx},
                            extra_link_args=["-fopenmp"])
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    archs = os.environ.get("XLKERNELS_CUDA_ARCHS", "80;90").split(";")
    nvcc = ["-O3", "--use_fast_math", "-lineinfo"]
    nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return CUDAExtension("xlkernels._C", sources,
                         extra_compile_args={"cxx": cxx + ["-DXLK_WITH_CUDA"], "nvcc": nvcc},
                         extra_link_args=["-fopenmp"])


setup(
    packages=find_packages(include=["xlkernels", "xlkernels.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
