from setuptools import find_packages, setup

setup(
    name="gptx",
    version="0.1.0",
    description="A small DeepSpeed pipeline-parallel GPT pretraining stack",
    packages=find_packages(include=["gptx", "gptx.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "deepspeed>=0.16", "tiktoken>=0.7", "numpy", "pyyaml", "wandb"],
    extras_require={
        # lm-evaluation-harness for tools/lm_eval_harness.py (tasks, metrics, its command line).
        "eval": ["lm-eval>=0.4.13"],
        # matplotlib for tools/plot_runs.py (drawn off-screen).
        "plot": ["matplotlib>=3.7"],
        # tools/prepare_data.py inputs: zstandard for .jsonl.zst (The Pile's files), pyarrow for parquet.
        "data": ["zstandard>=0.22", "pyarrow>=14"],
        # The tests of all three, plus transformers (through lm-eval's hf extra) for the cross-checks
        # against Hugging Face's GPT-2 on gptx's export.
        "dev": ["pytest", "lm-eval[hf]>=0.4.13", "matplotlib>=3.7", "zstandard>=0.22", "pyarrow>=14"],
    },
)
