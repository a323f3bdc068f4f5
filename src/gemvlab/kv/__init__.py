"""KV-cache compression: a cache that physically evicts tokens, the policies (full, window,
StreamingLLM, H2O, Keyformer) and the generation loops that run models through it."""
