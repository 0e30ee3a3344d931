"""The quantize stage: round-to-nearest (compressed-tensors), GPTQ and SmoothQuant+GPTQ (llm-compressor
in its own Ray pip environment), and a Squeeze10-style mixed 1-bit/4-bit reconstruction."""
