"""gptx: a small DeepSpeed pipeline-parallel GPT pretraining stack."""

__version__ = "0.1.0"
