"""Preference tuning (DPO, ORPO) in the engine's own loop, LoRA/QLoRA, reference = adapters off.

    dataset = load_pair_dataset(path, tokenizer, cfg.data)         # data.py: TRL's pair formats
    loader  = make_pair_loader(dataset, ...)                         # batches.py: both sides, one forward
    objective = build_objective(cfg.objective)                       # objective.py -> loss.py, logprobs.py
    loss_sum, metrics = objective.loss_sum(model, batch)             # sums over pairs

`python -m engine.train objective=dpo data.train_path=pairs.jsonl` (conf/objective/).
"""
