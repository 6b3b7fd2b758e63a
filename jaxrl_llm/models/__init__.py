"""Models: the Flax decoder (transformer), HF config and weights conversion, GGUF reading, loading and export."""
