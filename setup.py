"""clipfast: Triton kernels for CLIP training and inference.

The Triton kernels live in the top-level source folder ``kernels/`` but are installed as
``clipfast.kernels`` (a top-level package called ``kernels`` would clash with the Hugging Face
package of that name).
"""
from setuptools import find_packages, setup

setup(
    name="clipfast",
    version="0.1.0",
    description="Fused Triton kernels for CLIP models: attention, MLP, LayerNorm, patch embedding, contrastive loss",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["clipfast", "clipfast.*"]) + ["clipfast.kernels"],
    package_dir={"clipfast.kernels": "kernels"},
    # the shipped config tables (one per architecture), read by clipfast.kernels.configs
    package_data={"clipfast.kernels": ["configs/*.json"]},
    install_requires=[
        # torch brings a matching triton on Linux; both are listed so the contract is explicit.
        "torch>=2.11",
        "triton>=3.6",
        "einops",
        "numpy",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "pytest-timeout", "matplotlib"],
        "integrations": [
            "torchvision",
            "open_clip_torch>=3.0",
            "timm>=1.0",
            "transformers>=4.57",
            "clip-anytorch",
            "cn_clip",
            # what open_clip's training program (open_clip_train) imports: `clipfast run` is tested on it
            "webdataset>=0.2.5,<=0.2.86",
            "pandas",
            "braceexpand",
        ],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["clipfast=clipfast.cli:main"]},
)
