from setuptools import find_packages, setup

setup(
    name="gptx",
    version="0.1.0",
    description="A small DeepSpeed pipeline-parallel GPT pretraining stack",
    packages=find_packages(include=["gptx", "gptx.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "deepspeed>=0.16", "tiktoken>=0.7", "numpy", "pyyaml", "wandb"],
    extras_require={"dev": ["pytest"]},
)
