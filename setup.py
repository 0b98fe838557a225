"""dsv3_jax: DeepSeek-V3 (MLA, DeepSeekMoE, MTP, FP8) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="dsv3_jax",
    version="0.1.0",
    description="DeepSeek-V3 in JAX/Flax: MLA, DeepSeekMoE, multi-token prediction, FP8 training",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dsv3_jax", "dsv3_jax.*"]),
    python_requires=">=3.12",
    install_requires=[
        "jax>=0.11.2,<0.12",
        "jaxlib>=0.11.2,<0.12",
        "flax>=0.12.10,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.4,<0.13",
        "chex>=0.1.92",
        "numpy>=2.0",
        "grain>=0.2.18,<0.3",
        "tensorstore>=0.1.80",
        "sentencepiece>=0.2.2,<0.3",
        "safetensors>=0.8.0,<0.9",
        "ml-collections>=1.1.0",
        "absl-py>=2.1",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "tokenizers>=0.23,<0.24",  # Hugging Face tokenizer.json (DeepSeek's releases)
        "jinja2>=3.1",  # a checkpoint's own chat_template
    ],
    extras_require={
        # the serving tests talk to the server through the openai client
        "test": ["pytest>=8", "pytest-xdist>=3.6", "openai>=1.0", "httpx>=0.27"],
        "notebooks": ["nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29", "matplotlib>=3.9"],
        # the needle evaluation's heatmap; lm-evaluation-harness (pytablewriter >= 1.2: the
        # resolver may otherwise pick a release whose tables lose their headers)
        "eval": ["matplotlib>=3.9", "lm-eval>=0.4.13,<0.5", "pytablewriter>=1.2"],
        # python -m dsv3_jax.serve: the OpenAI-compatible HTTP server
        "serve": ["starlette>=1.0", "uvicorn>=0.30"],
    },
)
