"""Install MiniGPT: `pip install -e .` (install torch==2.13.0 first; see README)."""

from setuptools import find_packages, setup

setup(
    name="minigpt",
    version="0.1.0",
    description="Build a GPT-2 or Qwen2.5-style language model from scratch, HF-native end to end.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["minigpt", "minigpt.*"]),
    package_data={"minigpt": ["templates/*"]},
    python_requires=">=3.10",
    install_requires=[
        # torch is declared with a lower bound only: install torch==2.13.0 (CPU build) *before* this package,
        # otherwise pip resolves a multi-GB CUDA build.
        "torch>=2.13",
        "transformers>=5.24",
        "tokenizers>=0.23",
        "datasets>=5.2",
        "accelerate>=1.15",
        "peft>=0.21",
        "trl>=1.16",
        "safetensors>=0.8",
        "huggingface_hub>=2.4",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "tensorboard>=2.16",
    ],
    extras_require={
        "demo": ["gradio>=6.31"],
        "serve": ["transformers[serving]>=5.24"],
        "test": ["pytest>=8", "ruff>=0.6", "playwright>=1.50", "gradio>=6.31", "transformers[serving]>=5.24"],
    },
    entry_points={"console_scripts": ["minigpt=minigpt.cli:main"]},
)
