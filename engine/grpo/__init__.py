"""GRPO: reinforcement learning with verifiable rewards on LoRA / QLoRA (rollout.py: the engine's own generation)."""
