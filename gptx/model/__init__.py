"""The model's math: layers, the GPT as a list of LayerSpecs and as one module, its FLOPs, generation.

Knows nothing of pipelines or data parallelism (the LayerSpec list is the one DeepSpeed import)."""
