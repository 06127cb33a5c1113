"""The planner's report: the breakdown table, which switches fit the budget, `run_plan` for the
CLI, and the tables of docs/PLANNER.md."""


from __future__ import annotations

import json
import sys
from pathlib import Path
from engine.plan.shapes import ALLOCATOR_SLACK, GIB, KNOWN_SHAPE_NAMES, known_config, load_model_config
from engine.plan.grpo import format_grpo, grpo_plan_args, predict_grpo
from engine.plan.prediction import MAX_AUTO_MICRO_BATCH, max_micro_batch, max_seq_len, plan_settings, predict_for
from engine.config import ConfigError
from engine.config import from_dict

# ----------------------------------------------------------------------------- report

ROWS = (("quantized_weights", "base weights, 4-bit packed"), ("quant_state", "4-bit quantization state"),
        ("float_weights", "16/32-bit weights (embeddings, norms, lm_head; all for lora)"),
        ("lora_params", "LoRA params (fp32)"), ("lora_grads", "LoRA grads (fp32)"),
        ("optimizer_state", "optimizer state"),
        ("activations", "saved activations at end of forward"),
        ("attention_masks", "  of which attention masks"),
        ("final_hidden", "  of which final norm + last hidden (freed before backward)"),
        ("loss_peak", "loss peak (lm_head + cross-entropy)"),
        ("final_norm_backward", "final norm's backward"),
        ("recompute_peak", "one block recomputed in backward"),
        ("backward_transient", "backward transient of one block"),
        ("allocator_slack", f"allocator slack ({ALLOCATOR_SLACK:.0%})"), ("cuda_context", "CUDA context"))
_OFF = dict(activation_checkpointing=False, chunked_loss=False, offload_activations=False, mlp_tile_tokens=0,
            norm_tile_tokens=0)
SWITCHES = (("none", _OFF),
            ("checkpointing", {**_OFF, "activation_checkpointing": True}),
            ("+ chunked loss", {**_OFF, "activation_checkpointing": True, "chunked_loss": True}),
            ("+ offload", {**_OFF, "activation_checkpointing": True, "chunked_loss": True, "offload_activations": True}),
            ("+ tiled MLP", {**_OFF, "activation_checkpointing": True, "chunked_loss": True,
                             "offload_activations": True, "mlp_tile_tokens": "auto"}),
            ("+ tiled norms", {**_OFF, "activation_checkpointing": True, "chunked_loss": True,
                               "offload_activations": True, "mlp_tile_tokens": "auto", "norm_tile_tokens": "auto"}))
OTHER_SWITCHES = (("ckpt + chunked + tiled MLP and norms (no offload)",
                   {**_OFF, "activation_checkpointing": True, "chunked_loss": True, "mlp_tile_tokens": "auto",
                    "norm_tile_tokens": "auto"}),)
"""Rows beside the cumulative SWITCHES: the tiling without offloading."""


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def make_report(model_config, *, seq_len: int, micro_batch: int, budget: int, settings: dict) -> dict:
    """Everything `python -m engine.plan` prints, as a JSON-able dict."""
    b = predict_for(model_config, seq_len, micro_batch, **settings)
    switches = {}
    for name, flags in SWITCHES + OTHER_SWITCHES:
        s = {**settings, **flags}
        longest = max_seq_len(model_config, micro_batch, budget, **s)
        at_longest = predict_for(model_config, longest, micro_batch, **s) if longest else None
        switches[name] = {"total": predict_for(model_config, seq_len, micro_batch, **s).total,
                          "max_micro_batch": max_micro_batch(model_config, seq_len, budget, **s),
                          "max_seq_len": longest,
                          "dominant_at_max_seq_len": at_longest.dominant if at_longest else "",
                          "dominant_bytes": at_longest.terms.get(at_longest.dominant, 0) if at_longest else 0}
    return {"model_type": model_config.model_type, "seq_len": seq_len, "micro_batch": micro_batch,
            "budget": budget, "settings": settings, "breakdown": b.as_dict(), "fits": b.total <= budget,
            "max_micro_batch": max_micro_batch(model_config, seq_len, budget, **settings),
            "max_seq_len": max_seq_len(model_config, micro_batch, budget, **settings), "switches": switches}


def format_report(report: dict) -> str:
    s, b = report["settings"], report["breakdown"]
    tiles = s.get("mlp_tile_tokens", 0)
    lines = [f"{report['model_type']}: {s['method']} r={s['r']} targets={s['targets']} {s['precision']} "
             f"{s['optimizer']}, {report['micro_batch']} x {report['seq_len']} tokens, "
             f"{'packed' if s['packing'] else 'padded'}, checkpointing={s['activation_checkpointing']} "
             f"chunked_loss={s['chunked_loss']} offload={s['offload_activations']} mlp_tile_tokens={tiles}"
             + (f" (tiles of {b['mlp_tile_tokens']})" if b["mlp_tile_tokens"] else "")
             + f" norm_tile_tokens={s.get('norm_tile_tokens', 0)}"
             + (f" (tiles of {b['norm_tile_tokens']})" if b["norm_tile_tokens"] else ""), "",
             f"| {'component':<60} | GiB    |", f"|{'-' * 62}|--------|"]
    lines += [f"| {label:<60} | {gib(b[key]):>6} |" for key, label in ROWS if b[key]]
    lines += [f"| {'static (weights, LoRA, optimizer)':<60} | {gib(b['static']):>6} |",
              f"| {'dynamic (activations + max of the phases; peak: ' + b['peak_phase'] + ')':<60} | {gib(b['dynamic']):>6} |",
              f"| {'**predicted peak**':<60} | {gib(b['total']):>6} |"]
    if b["host_offloaded"]:
        lines.append(f"| {'(pinned CPU memory for offloaded activations)':<60} | {gib(b['host_offloaded']):>6} |")
    top = sorted(b["terms"].items(), key=lambda kv: -kv[1])[:4]
    lines += ["", f"largest terms of the {b['peak_phase']} phase: "
              + "; ".join(f"{name} {gib(n)} GiB" for name, n in top)]
    verdict = "fits" if report["fits"] else "does NOT fit"
    lines += ["", f"{verdict} in the budget of {gib(report['budget'])} GiB; largest micro-batch at "
              f"{report['seq_len']} tokens: {report['max_micro_batch']}; longest sequence at micro-batch "
              f"{report['micro_batch']}: {report['max_seq_len']} tokens", "",
              "| switches | peak GiB | fits | max micro-batch | max seq len | largest term there (GiB) |",
              "|---|---|---|---|---|---|"]
    for name, row in report["switches"].items():
        lines.append(f"| {name} | {gib(row['total'])} | {'yes' if row['total'] <= report['budget'] else 'no'} "
                     f"| {row['max_micro_batch']} | {row['max_seq_len']} | {row['dominant_at_max_seq_len']}"
                     f"{' ' + gib(row['dominant_bytes']) if row['dominant_bytes'] else ''} |")
    return "\n".join(lines)


def _validate_for_planning(cfg) -> None:
    """RunConfig.validate without the checks that need files the planner does not read."""

    for section in (cfg.peft, cfg.optim, cfg.train, cfg.eval):
        section.validate()
    if not cfg.model.path.startswith("shape:"):
        cfg.model.validate()
    if not isinstance(cfg.data.max_seq_len, int) or cfg.data.max_seq_len < 8:
        raise ConfigError(f"config key 'data.max_seq_len': must be an integer >= 8, got {cfg.data.max_seq_len!r}")


def run_plan(raw: dict) -> dict:
    """Plan from a raw config dict (Hydra's, resolved); `plan_json` (optional) names a JSON output file."""

    raw = dict(raw)
    json_path = raw.pop("plan_json", None)
    cfg = from_dict(raw)
    _validate_for_planning(cfg)
    model_config = load_model_config(cfg.model.path)
    settings = plan_settings(cfg)
    budget = int(cfg.train.memory_budget_gib * GIB)
    micro_batch = cfg.train.micro_batch_size
    if micro_batch == "auto":
        micro_batch = max(1, min(MAX_AUTO_MICRO_BATCH,
                                 max_micro_batch(model_config, cfg.data.max_seq_len, budget, **settings)))
    report = make_report(model_config, seq_len=cfg.data.max_seq_len, micro_batch=micro_batch,
                         budget=budget, settings=settings)
    report["model_path"] = cfg.model.path
    text = format_report(report)
    grpo = grpo_plan_args(cfg.objective)
    if grpo is not None:  # objective=grpo: the rollout and the reference forward beside the step
        # as speed.resolve decides: merged copies unless switched off; 4-bit bases dequantized on a CPU only
        merge = cfg.speed.mode != "off" and "rollout_merge" not in cfg.speed.disable and not cfg.train.fsdp
        dequantize = merge and not settings.get("cuda", True) and "rollout_dequantize" not in cfg.speed.disable
        lean = cfg.speed.mode != "off" and "rollout_lean_decode" not in cfg.speed.disable and not cfg.train.fsdp
        b = predict_grpo(model_config, seq_len=cfg.data.max_seq_len, micro_batch=micro_batch, **grpo, **settings,
                         rollout_merge=merge, rollout_dequantize=dequantize, rollout_lean_decode=lean)
        report["grpo"] = b.as_dict()
        text += "\n" + format_grpo(b, budget, grpo["prompts_per_step"])
    print(text)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2, default=str))
        print(f"\nwrote {json_path}", file=sys.stderr)
    return report


# ----------------------------------------------------------------------------- docs/PLANNER.md tables

def _qlora(**over) -> dict:
    base = dict(method="qlora", r=16, targets="all-linear", precision="fp16", base_dtype="fp16",
                optimizer="paged_adamw_32bit", loss_chunk_size=1024, dropout=0.0, double_quant=True,
                cuda=True, packing=True, activation_checkpointing=False, chunked_loss=False,
                offload_activations=False, mlp_tile_tokens=0, norm_tile_tokens=0)
    return {**base, **over}


def answers_markdown(budget_gib: float = 14.7) -> str:
    """The prediction tables of docs/PLANNER.md (`python -m engine.plan --answers`)."""
    budget = int(budget_gib * GIB)
    out = []
    llama = known_config("llama-3.1-8b")
    for packing, title in ((True, "packed rows (the engine's default: packed attention, SDPA per document, no mask)"),
                           (False, "one document per row (no mask: SDPA is_causal, GQA not repeated)")):
        out += [f"#### Llama-3.1-8B QLoRA, r16 all-linear, fp16, paged AdamW 32-bit, micro-batch 1, {title}", "",
                "| tokens | " + " | ".join(n for n, _ in SWITCHES) + " |", "|---|" + "---|" * len(SWITCHES)]
        for t in (2048, 8192, 16384, 32768, 49152, 65536):
            cells = []
            for _, flags in SWITCHES:
                b = predict_for(llama, t, 1, **_qlora(packing=packing, **flags))
                cells.append(f"{gib(b.total)} {'yes' if b.total <= budget else '**no**'}")
            out.append(f"| {t} | " + " | ".join(cells) + " |")
        out.append("")
    phi = known_config("phi-3-mini")
    seed = dict(r=32, targets=["o_proj", "qkv_proj", "gate_up_proj", "down_proj", "lm_head"], optimizer="adamw",
                packing=False, activation_checkpointing=True)
    out += ["#### Phi-3-mini seed recipe: QLoRA nf4 r32 (o/qkv/gate_up/down/lm_head), fp16, checkpointing, "
            "micro-batch 2, padded", "", "| tokens per row | loss | peak GiB | fits | loss peak GiB | largest micro-batch |",
            "|---|---|---|---|---|---|"]
    for t in (4096, 4608):
        for chunked in (False, True):
            s = _qlora(**seed, chunked_loss=chunked)
            b = predict_for(phi, t, 2, **s)
            out.append(f"| {t} | {'chunked' if chunked else 'full logits (as HF)'} | {gib(b.total)} | "
                       f"{'yes' if b.total <= budget else '**no**'} | {gib(b.loss_peak)} | "
                       f"{max_micro_batch(phi, t, budget, **s)} |")
    out += ["", "#### T4 recipes (checkpointing + chunked loss, packed, fp16; QLoRA r16 all-linear, "
            "paged AdamW 32-bit; SmolLM2: 16-bit LoRA)", "",
            "| model | seq len | micro-batch | predicted peak GiB | switches | longest seq at micro-batch 1 "
            "(+ offload; + tiled MLP and norms) |", "|---|---|---|---|---|---|"]
    for name in KNOWN_SHAPE_NAMES:
        cfg = known_config(name)
        method = "lora" if name == "smollm2-135m" else "qlora"
        s = _qlora(method=method, activation_checkpointing=True, chunked_loss=True)
        longest = max_seq_len(cfg, 1, budget, **s)
        longest_off = max_seq_len(cfg, 1, budget, **{**s, "offload_activations": True})
        longest_tiled = max_seq_len(cfg, 1, budget, **{**s, "offload_activations": True, "mlp_tile_tokens": "auto",
                                                       "norm_tile_tokens": "auto"})
        longest = f"{longest} ({longest_off}; {longest_tiled})"
        for t in (2048, 4096, 8192):
            mb = max_micro_batch(cfg, t, budget, limit=MAX_AUTO_MICRO_BATCH, **s)
            if mb == 0:
                out.append(f"| {name} | {t} | - | does not fit | ckpt + chunked | {longest} |")
                continue
            b = predict_for(cfg, t, mb, **s)
            out.append(f"| {name} | {t} | {mb} | {gib(b.total)} | ckpt + chunked | {longest} |")
    return "\n".join(out)
