"""para-train: distributed training of paragraph-to-image diffusion models (ParaDiffusion) on DeepSpeed."""
from setuptools import find_packages, setup

setup(
    name="para-train",
    version="0.1.0",
    description="Train ParaDiffusion-style paragraph-to-image diffusion models on DeepSpeed ZeRO-3",
    python_requires=">=3.10",
    # kernels/ is installed as para_train.kernels: a top-level module named `kernels` would clash
    # with the PyPI distribution of that name that transformers and diffusers probe for.
    packages=find_packages(include=["para_train", "para_train.*"]) + ["para_train.kernels"],
    package_dir={"para_train.kernels": "kernels"},
    # Honest ranges, so that para-train installs into a user's environment: lower bounds for what the code
    # uses, upper bounds only where something is known to break. The tested stack is pinned separately in
    # constraints.txt (`bash install.sh` installs from it; `bash install.sh --refresh-lock` re-resolves it).
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        # <5: mosaicml-streaming 0.13 (its latest release) requires transformers<5 (and numpy<2.2); that
        # holds huggingface-hub below 1.0 and so diffusers at 0.39. Lift it when streaming does.
        "transformers>=4.45,<5",
        "peft>=0.13",
        "diffusers>=0.31",
        "mosaicml-streaming==0.13.*",  # para_train/data/dataset.py guards against 0.13 download races
        "triton>=3.0",
        "mlflow>=2.16",
        "safetensors",
        "pyyaml",
        "pillow",
        "numpy",
        "tqdm",
        "boto3",
    ],
    extras_require={
        "dev": ["pytest>=8", "moto[server]>=5"],
        "gpu": ["flash-attn>=2.6"],
    },
    entry_points={"console_scripts": ["para-train=para_train.cli:main"]},
)
