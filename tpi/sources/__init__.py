"""Where models come from: GGUF conversion, the model cache, the embedded default."""
