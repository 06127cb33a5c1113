"""engine: a hand-rolled LoRA / QLoRA fine-tuning engine for causal LMs."""
