"""The world outside gptx: Hugging Face export and import, lm-evaluation-harness, evaluation on text."""
