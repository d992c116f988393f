"""Packaging for detr_fast.

The Triton kernels live in the top-level ``kernels/`` folder of the repository but are
installed as ``detr_fast.kernels``: the bare import name ``kernels`` belongs to another
widely used package (transformers imports it), so we must not claim it.
"""
from setuptools import setup

HF = ["transformers>=5.0", "timm>=1.0"]
ONNX = ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.2"]

setup(
    name="detr_fast",
    version="0.1.0",
    description="Fused Triton/CUDA kernels for the backbone stage of DETR-family detectors",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["detr_fast", "detr_fast.kernels"],
    package_dir={"detr_fast": "detr_fast", "detr_fast.kernels": "kernels"},
    install_requires=["torch>=2.1", "torchvision>=0.16", "triton>=2.1"],
    extras_require={
        # transformers' DETR family (convert() of DetrForObjectDetection & co.) and its timm backbones.
        "hf": HF,
        # ONNX export checks and the onnxruntime peer of the CPU benchmarks (dynamo=True needs onnxscript).
        "onnx": ONNX,
        "test": ["pytest>=7", "pytest-benchmark>=4", "numpy", "ruff>=0.5"] + HF + ONNX,
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["detr-fast=detr_fast.__main__:main"]},
)
