"""KV-cache eviction policies (Keyformer, H2O, StreamingLLM, window) and their decode loop."""
