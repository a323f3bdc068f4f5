"""Hardware simulation of batched LLM decoding (NeuPIMs): cost models, schedules, traces."""
