"""`python -m engine.plan`: predict the peak GPU memory of a LoRA / QLoRA step before running it.

Reads only the model's config (config.json, GGUF metadata, or a built-in `shape:NAME`), never
its weights, and adds up what a training step holds at its worst moment (FIELD.md bug 9:
nobody predicts memory before the run):

    peak = static + max(loss phase, backward phase), then x (1 + allocator slack) + CUDA context
    static         = base weights (16-bit, or 4-bit packed + quantization state) + float parts
                     + LoRA params + their grads + optimizer state
    loss phase     = saved activations + the loss's own peak (full [tokens, vocab] fp32 logits,
                     or one chunk of them)
    backward phase = saved activations - the final norm's copy and the last hidden state
                     + (with checkpointing) one block recomputed
                     + what one block's backward holds at its fullest moment (its MLP's
                       gradients, or one MLP tile with train.mlp_tile_tokens, or attention's)

Saved activations are derived op by op from what autograd keeps for backward in the
transformers 5 Llama-family blocks with our `LoRALinear` (engine/plan/block.py); the
same per-op list was checked against `torch.autograd.graph.saved_tensors_hooks` counts and a
live-tensor tracker on CPU (tests/plan/test_plan.py, docs/PLANNER.md). Everything CUDA-specific
(context, allocator slack, SDPA kernel choice) is a stated assumption, not a measurement.

Usage (the same Hydra config and overrides as `python -m engine.train`):
    python -m engine.plan model.path=shape:llama-3.1-8b peft=qlora data.max_seq_len=8192 \
        train.micro_batch_size=1 train.activation_checkpointing=true [+plan_json=plan.json]
"""

from __future__ import annotations

import sys

from engine.config import CONF_DIR, ConfigError, register_configs
from engine.plan.report import answers_markdown, run_plan
from engine.plan.shapes import PlanError

# ----------------------------------------------------------------------------- entry point

def _hydra_main():
    import hydra
    from omegaconf import OmegaConf


    register_configs()

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR),
                config_name="config")
    def main(dcfg) -> None:
        try:
            run_plan(OmegaConf.to_container(dcfg, resolve=True))
        except (ConfigError, PlanError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    main()


if __name__ == "__main__":
    if sys.argv[1:] == ["--answers"]:
        print(answers_markdown())
    else:
        # the planner writes nothing: keep Hydra from creating the run's output_dir
        if not any(a.startswith("hydra.run.dir=") for a in sys.argv[1:]):
            sys.argv.append("hydra.run.dir=.")
        _hydra_main()
