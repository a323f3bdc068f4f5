"""Parameter-efficient finetuning: LoRA and orthogonal finetuning (OFT, OFTv2) adapters."""
