"""KV caches: the dense per-sequence cache, KIVI quantization math, quantized layer caches, the quantized cache."""
