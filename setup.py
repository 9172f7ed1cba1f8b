"""deepseek-moe packaging. Installing never queries a GPU; the optional csrc extension is opt-in."""
from setuptools import find_packages, setup

with open("README.md", encoding="utf-8") as f:
    long_description = f.read()

extras = {
    "test": ["pytest>=8", "hypothesis>=6.100"],
    "triton": ["triton>=3.0"],
    "hf": ["transformers>=4.57", "accelerate>=1.0"],
    "bench": ["rich>=13", "matplotlib>=3.8"],
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
    install_requires=["torch>=2.4"],
    extras_require=extras,
    entry_points={"console_scripts": ["deepseek-moe-bench = deepseek_moe.bench.cli:main_exit"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
