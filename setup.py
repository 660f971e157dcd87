"""Build script: two pure-Python packages plus an optional CUDA extension (csrc/).

Build knobs (environment variables):
    SWITCH_DIT_BUILD_CUDA=0        never build the extension (default: build when nvcc is found)
    SWITCH_DIT_CUDA_ARCHS="80;90"  CUDA architectures for the extension
"""
from setuptools import find_packages, setup

setup(
    name="switch-dit",
    version="0.1.0",
    description="Switch Diffusion Transformer with fused Mixture-of-Experts kernels",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["switch_dit_kernels*", "switch_dit*", "benchmarks*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "scipy", "einops", "tqdm", "pillow", "scikit-learn",
                      "matplotlib"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest", "pytest-xdist", "pytest-benchmark", "triton>=3.2", "ninja", "pybind11"],
        "fid": ["torch-fidelity"],
        "latents": ["diffusers"],
    },
    entry_points={"console_scripts": [
        "switch-dit-train=switch_dit.train:main",
        "switch-dit-sample=switch_dit.sample:main",
        "switch-dit-evaluate=switch_dit.evaluate:main",
    ]},
)
