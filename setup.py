"""Build xlkernels. Two kinds of build, chosen by whether this process can import torch:

- torch importable (make build, make cuda-build, `pip install --no-build-isolation`): xlkernels._C is built ahead
  of time against that torch (CPU kernels always; CUDA kernels when torch is a CUDA build and a CUDA toolkit is
  found; XLKERNELS_BUILD_CUDA=0|1 overrides), and _C_build.json next to it records the torch. At import
  xlkernels loads it only when the running torch is that one.
- no torch (pip's default build isolation, `python -m build`: pyproject.toml does not list torch, so the build
  environment never gets one): a pure-Python wheel. The C++/CUDA sources travel in it (xlkernels/_csrc) and
  _C is compiled on first use against the torch it then runs with (xlkernels/_ext.py).

Either way the C++/CUDA sources are shipped, so a prebuilt _C that does not match the running torch is rebuilt.
The C++ standard is torch's default (C++20 from torch 2.13 on, whose headers need it).
"""
import importlib.util
import json
import os
import re
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("_xlk_build", os.path.join(HERE, "xlkernels", "_build.py"))
B = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(B)


def _torch():
    """torch when it is importable here and not one a build frontend put into an isolated build environment.
    XLKERNELS_AOT=0 builds the pure-Python package even so; =1 uses whatever torch is importable."""
    if B.env_flag("XLKERNELS_AOT") is False:
        return None
    try:
        import torch
    except ImportError:
        return None
    if re.search(r"[/\\](pip-)?build-env-", torch.__file__) and B.env_flag("XLKERNELS_AOT") is not True:
        print(f"xlkernels: ignoring the torch of an isolated build environment ({torch.__file__})", file=sys.stderr)
        return None
    try:
        B.check_torch(torch.__version__)
    except B.UnsupportedTorch as e:
        sys.exit(f"xlkernels: cannot build _C: {e}")
    return torch


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package (xlkernels/_csrc) for compiling _C on first use. Not in editable installs,
    which compile from the checkout's csrc/."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False) and os.path.isdir(os.path.join(HERE, "csrc")):
            dst = os.path.join(self.build_lib, "xlkernels", "_csrc")
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(os.path.join(HERE, "csrc"), dst,
                            ignore=lambda d, names: [n for n in names if not n.endswith(B._SUFFIXES)
                                                     and not os.path.isdir(os.path.join(d, n))])


def _aot(torch):
    from torch.utils import cpp_extension as ce

    with_cuda, why = B.want_cuda(torch.version.cuda)
    print(f"xlkernels: building _C ahead of time against torch {torch.__version__}, "
          f"{'with' if with_cuda else 'without'} CUDA kernels ({why})", file=sys.stderr)
    csrc = os.path.join(HERE, "csrc")
    sources = [os.path.relpath(p, HERE) for p in B.sources(csrc, with_cuda)]
    archs = B.cuda_archs() if with_cuda else []
    if with_cuda:
        home = B.find_cuda_home()
        if home is None:
            sys.exit("xlkernels: XLKERNELS_BUILD_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        ce.CUDA_HOME = home  # torch guesses it from nvcc's directory, which may be a wrapper outside the toolkit
        ext = ce.CUDAExtension("xlkernels._C", sources,
                               extra_compile_args={"cxx": B.CXX_FLAGS + ["-DXLK_WITH_CUDA"],
                                                   "nvcc": B.nvcc_flags(archs)},
                               extra_link_args=B.LD_FLAGS)
    else:
        ext = ce.CppExtension("xlkernels._C", sources, extra_compile_args={"cxx": B.CXX_FLAGS},
                              extra_link_args=B.LD_FLAGS)
    record = B.build_record(torch.__version__, torch.version.cuda, with_cuda, csrc, archs)

    class BuildExtWithRecord(ce.BuildExtension.with_options(use_ninja=True)):
        """Writes _C_build.json (the torch it was built against) beside _C, in the build tree and, for in-place and
        editable builds, in the source tree. Rebuilds when the existing record names another torch."""

        def _targets(self):
            package_dir = self.get_finalized_command("build_py").get_package_dir("xlkernels")
            for e in self.extensions:
                regular = os.path.join(self.build_lib, self.get_ext_filename(self.get_ext_fullname(e.name)))
                yield regular
                if self.inplace:
                    yield os.path.join(package_dir, os.path.basename(regular))

        def run(self):
            for so in self._targets():
                old = B.read_record(os.path.join(os.path.dirname(so), B.BUILD_INFO))
                if old is None or old.get("torch") != record["torch"] or old.get("with_cuda") != with_cuda:
                    self.force = True  # setuptools only compares source mtimes; a new torch needs a rebuild
            super().run()
            for so in self._targets():
                if os.path.exists(so):
                    with open(os.path.join(os.path.dirname(so), B.BUILD_INFO), "w") as f:
                        json.dump(record, f, indent=1)

    return [ext], {"build_ext": BuildExtWithRecord}


torch = _torch()
ext_modules, cmdclass = _aot(torch) if torch is not None else ([], {})
if torch is None:
    print("xlkernels: no torch in this build environment: building a pure-Python package; xlkernels._C is "
          "compiled on first use against the installed torch", file=sys.stderr)

setup(
    packages=find_packages(include=["xlkernels", "xlkernels.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_py": BuildPyWithSources, **cmdclass},
)
