"""Token data: the GPT-2 tokenizer offline, token files and resumable batch windows, mixtures of
sources, and preparing text into token files."""
