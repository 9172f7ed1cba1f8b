"""deepseek-moe packaging. Installing never queries a GPU; the optional csrc extension is opt-in.

    DEEPSEEK_MOE_BUILD_EXT=1 pip install -e . --no-build-isolation     # build csrc/ ahead of time

With a CUDA build of torch and CUDA_HOME, the CUDA kernels are built too; their architectures come from
TORCH_CUDA_ARCH_LIST (required then, e.g. "9.0": the build never asks a GPU). DEEPSEEK_MOE_BUILD_CUDA=0 builds
the CPU part only. Without DEEPSEEK_MOE_BUILD_EXT nothing is compiled; ``deepseek_moe.ext.load()`` can still
build the CPU extension just in time from a source checkout.
"""
import glob
import os
import sys

from setuptools import find_packages, setup


def _extension():
    """(ext_modules, cmdclass) for the opt-in build of csrc/, or ([], {})."""
    if os.environ.get("DEEPSEEK_MOE_BUILD_EXT", "0") != "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        sys.exit("DEEPSEEK_MOE_BUILD_EXT=1 needs torch installed first and pip's --no-build-isolation "
                 "(pip install torch && DEEPSEEK_MOE_BUILD_EXT=1 pip install -e . --no-build-isolation)")
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp"]
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                 and os.environ.get("DEEPSEEK_MOE_BUILD_CUDA", "1") != "0")
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            sys.exit("building the CUDA kernels needs TORCH_CUDA_ARCH_LIST (e.g. '9.0' for H100/H200, '8.0;9.0'); "
                     "the build does not query GPUs. Or set DEEPSEEK_MOE_BUILD_CUDA=0 for the CPU part only.")
        module = CUDAExtension("deepseek_moe._C", sources + sorted(glob.glob("csrc/cuda/*.cu"))
                               + sorted(glob.glob("csrc/cuda/*.cpp")),
                               extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},
                               extra_link_args=["-fopenmp"])
    else:
        module = CppExtension("deepseek_moe._C", sources, extra_compile_args=cxx, extra_link_args=["-fopenmp"])
    class BuildWithHint(BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception:
                print("\ndeepseek-moe: building the optional csrc/ extension failed (the compiler's messages are "
                      "above). The package works without it: install without DEEPSEEK_MOE_BUILD_EXT, or fix the "
                      "toolchain (a C++17 compiler, ninja; for CUDA, nvcc matching torch.version.cuda) and retry.",
                      file=sys.stderr)
                raise

    return [module], {"build_ext": BuildWithHint}


ext_modules, cmdclass = _extension()

with open("README.md", encoding="utf-8") as f:
    long_description = f.read()

extras = {
    "test": ["pytest>=8", "hypothesis>=6.100"],
    "triton": ["triton>=3.6"],
    "hf": ["transformers>=5.19", "accelerate>=1.3"],
    # LoRA on the fused experts: PEFT >= 0.20 reads transformers 5's (E, out, in) expert layout (docs/versions.md).
    "peft": ["peft>=0.20"],
    "bench": ["rich>=13", "matplotlib>=3.8"],
    "ext": ["ninja"],
}
extras["dev"] = sorted({dep for deps in extras.values() for dep in deps})

setup(
    name="deepseek-moe",
    version="0.1.0",
    description="DeepSeekMoE layer for PyTorch: shared + fine-grained routed experts, DeepSeek-V2/V3 routing, "
                "balance losses, grouped-GEMM backends",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["deepseek_moe", "deepseek_moe.*"]),
    package_data={"deepseek_moe.kernels": ["tuned_tiles.json"]},  # the GPU tile sweep's winners
    install_requires=["torch>=2.10", "numpy"],
    extras_require=extras,
    entry_points={"console_scripts": ["deepseek-moe-bench = deepseek_moe.bench.cli:main_exit"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
