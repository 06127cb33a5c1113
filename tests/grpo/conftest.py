"""A tiny GRPO run: a seeded tiny Llama, 12 conversational prompts, a reward file written by the test."""

import json
from dataclasses import replace
from pathlib import Path

from engine.config import DataConfig, EvalConfig, ModelConfig, ObjectiveConfig, OptimConfig, PeftConfig, RunConfig, TrainConfig

REWARDS = '''
def digits(completions, target, **kwargs):
    """Share of digits in the completion, plus 1 where it holds the target: rewards that vary."""
    out = []
    for c, t in zip(completions, target):
        text = c[0]["content"] if isinstance(c, list) else c
        out.append(sum(ch.isdigit() for ch in text) / max(len(text), 1) + float(t in text))
    return out


def length(completions, completion_ids, **kwargs):
    return [len(ids) / 10 for ids in completion_ids]
'''


def write_prompts(root: Path, n: int = 12) -> Path:
    path = root / "prompts.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"say {i}"}], "target": str(i)}) + "\n")
    return path


def grpo_config(root: Path, model_dir, *, peft: PeftConfig | None = None, max_steps: int = 4, **objective) -> RunConfig:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    prompts = write_prompts(root)
    (root / "rewards.py").write_text(REWARDS)
    o = dict(name="grpo", beta=0.04, loss_type="dapo", prompts_per_step=2, num_generations=4, max_completion_length=8,
             num_iterations=2, rewards=[f"{root / 'rewards.py'}:digits", f"{root / 'rewards.py'}:length"],
             reward_weights=[1.0, 0.5])
    o.update(objective)
    return RunConfig(output_dir=str(root / "run"), model=ModelConfig(path=str(model_dir)),
                     data=DataConfig(train_path=str(prompts), eval_path=str(prompts), max_seq_len=48),
                     peft=peft or PeftConfig(r=4, alpha=8), optim=OptimConfig(lr=1e-2),
                     train=TrainConfig(max_steps=max_steps, micro_batch_size=2, precision="fp32", plots=False,
                                       log_every=2, save_every=2),
                     eval=EvalConfig(max_examples=4, batch_size=4),
                     objective=ObjectiveConfig(**o)).validate()


def with_train(cfg: RunConfig, **train) -> RunConfig:
    return replace(cfg, train=replace(cfg.train, **train)).validate()
