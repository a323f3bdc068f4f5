"""KV-cache compression: eviction policies (evict/) and quantized caches (quant/)."""
