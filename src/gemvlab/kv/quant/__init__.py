"""KV-cache quantization (KIVI, CommVQ): codecs, packed codes, the quantized cache."""
