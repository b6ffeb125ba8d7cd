"""Build fastlayers._C: our own C++ (and, where possible, CUDA) kernels for torch.

CPU build: always.  CUDA build: when torch has CUDA, nvcc is found, and
FASTLAYERS_NO_CUDA is not set.  FASTLAYERS_SANITIZE=1 builds with ASan+UBSan.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup
from torch.utils import cpp_extension

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda():
    if os.environ.get("FASTLAYERS_NO_CUDA", "0") not in ("", "0"):
        return False
    if torch.version.cuda is None:
        return False
    return cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None


def _add_sm90a():
    """The wgmma GEMM (csrc/cuda/gemm_wgmma.cu) needs an sm_90a image: when the
    arch list has 9.0, add 9.0a (torch then passes -gencode
    arch=compute_90a,code=sm_90a for every .cu; the sm_90 image stays, and on
    Hopper the driver is expected to load the sm_90a one). Extra arch flags in nvcc's
    extra_compile_args would make torch drop its own arch flags, hence the
    list. FASTLAYERS_SM90A=0 leaves it out (the wgmma GEMM then declines and the
    mma.sync kernel runs), and so does a CUDA older than 12.0 (no sm_90a there).
    benchmarks/gpu_check.sh builds TORCH_CUDA_ARCH_LIST=9.0a alone (one Hopper
    image per file: half the compile time); the default 8.0;9.0;9.0a build has not
    been run on a GPU yet (the kernel's probe declines if the driver loads the
    sm_90 image). Named lists ("Hopper", "native") are left as they are."""
    if os.environ.get("FASTLAYERS_SM90A", "1") == "0":
        return
    try:
        if int((torch.version.cuda or "0").split(".")[0]) < 12:
            return
    except ValueError:
        return
    archs = [a for a in os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(" ", ";").split(";") if a]
    bare = [a.split("+")[0] for a in archs]
    if "9.0" in bare and "9.0a" not in bare:
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs + ["9.0a"])


def _extension():
    with_cuda = _want_cuda()
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cxx = ["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unused-function",
           "-Wno-unknown-pragmas", "-DFASTLAYERS_EXT"]
    ldflags = ["-fopenmp"]
    # Share torch's own libgomp (torch/lib/libgomp.so.1): one OpenMP runtime in
    # the process, so torch.set_num_threads governs our at::parallel_for.
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    ldflags += [f"-Wl,-rpath,{torch_lib}", f"-L{torch_lib}"]
    if os.environ.get("FASTLAYERS_SANITIZE", "0") not in ("", "0"):
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
        cxx = [f for f in cxx if f != "-O3"] + ["-O1"] + san
        ldflags += san
    if not with_cuda:
        return cpp_extension.CppExtension(
            "fastlayers._C", sources, extra_compile_args={"cxx": cxx},
            extra_link_args=ldflags)
    # No visible GPU (e.g. building on a CPU box): torch's default arch
    # detection fails, so pick Ampere + Hopper.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    _add_sm90a()
    sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    nvcc = ["-O3", "-std=c++17", "-lineinfo",
            "-DFASTLAYERS_EXT"]
    return cpp_extension.CUDAExtension(
        "fastlayers._C", sources,
        extra_compile_args={"cxx": cxx + ["-DFASTLAYERS_WITH_CUDA"], "nvcc": nvcc},
        extra_link_args=ldflags)


setup(
    name="fastlayers",
    version="0.1.0",
    packages=find_packages(include=["fastlayers", "fastlayers.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
)
