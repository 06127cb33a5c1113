"""Peak host memory and time of `engine.export.merge`: streamed vs in memory, three model sizes.

Builds random Llama-shaped bf16 checkpoints in ~50 MB shards (225 MB to 886 MB; the middle one is
about the 235M-parameter model of issue 23) plus a random rank-16 all-linear LoRA adapter, then merges
each in fresh subprocesses and reports each child's peak RSS (getrusage ru_maxrss) minus the
peak of a child that only imports the same modules (the idle interpreter):
  idle                  python + torch: the baseline of "over idle"
  import-only           python + torch + transformers + engine.export (+ gguf), nothing merged
  streamed              merge(..., drift="off"): tensor by tensor (engine/export/stream_merge.py)
  streamed + gguf q4_0  the same, then the GGUF written from the merged shards, tensor by tensor
  in memory             merge(..., streamed=False, drift="off"): the whole base in fp32 (the old path)
Output dtype is the base's (bf16) everywhere. Checkpoints are written by a subprocess so this
parent stays small (a child's ru_maxrss starts from the parent's RSS at fork).

    python benchmarks/merge_memory.py          # writes benchmarks/results/merge_memory.{json,md}
    python benchmarks/merge_memory.py --quick  # one small model, for a smoke test (not saved)
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
sys.path.insert(0, ROOT)
BASE_SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                  num_key_value_heads=8, tie_word_embeddings=False, max_position_embeddings=2048)
SIZES = {"small": 4, "large": 16, "xl": 32}  # num_hidden_layers
QUICK = {"quick": dict(vocab_size=2048, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                       num_key_value_heads=2, num_hidden_layers=2, tie_word_embeddings=False)}
SHARD_BYTES = 50 * 10**6
MODES = ("idle", "import-only", "streamed", "streamed + gguf q4_0", "in memory")
RANK = 16


def _mb(n_bytes: float) -> float:
    return round(n_bytes / 10**6, 1)


def build(directory: str, shape: dict, shard_bytes: int) -> dict:
    """Random bf16 Llama checkpoint (shards <= shard_bytes, written one at a time), a tokenizer,
    and a random rank-16 adapter on every linear of the decoder blocks in directory/adapter."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from engine.model.build import params_on_meta
    from tests.conftest import make_tiny_tokenizer

    config = LlamaConfig(**shape, dtype="bfloat16")
    model_dir = os.path.join(directory, "model")
    config.save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    with params_on_meta():
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()
                  if k.endswith(("weight", "bias"))}
    gen = torch.Generator().manual_seed(0)
    shards, current, size = [], [], 0
    for name, s in shapes.items():
        nbytes = 2 * torch.Size(s).numel()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: (torch.randn(shapes[k], generator=gen) * 0.02).bfloat16() for k in names}
        save_file(tensors, os.path.join(model_dir, file), metadata={"format": "pt"})
        weight_map.update({k: file for k in names})
        del tensors
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    with open(os.path.join(model_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    adapter = {}
    targets = [k[: -len(".weight")] for k, s in shapes.items() if ".layers." in k and len(s) == 2]
    for module in targets:
        out_f, in_f = shapes[module + ".weight"]
        adapter[f"base_model.model.{module}.lora_A.weight"] = torch.randn(RANK, in_f, generator=gen) * 0.01
        adapter[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, RANK, generator=gen) * 0.01
    adapter_dir = os.path.join(directory, "adapter")
    os.makedirs(adapter_dir)
    save_file(adapter, os.path.join(adapter_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(adapter_dir, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": "all-linear",
                   "bias": "none", "use_rslora": False, "use_dora": False}, f)
    sizes = [os.path.getsize(os.path.join(model_dir, f)) for f in sorted(set(weight_map.values()))]
    return {"params": sum(torch.Size(s).numel() for s in shapes.values()), "checkpoint_bytes": sum(sizes),
            "shards": len(sizes), "largest_shard_bytes": max(sizes),
            "adapter_bytes": os.path.getsize(os.path.join(adapter_dir, "adapter_model.safetensors"))}


def child(mode: str, directory: str) -> None:
    """Runs in a fresh process: import, (merge), print peak RSS and time as JSON."""
    import shutil

    import torch  # noqa: F401

    if mode == "idle":  # the idle interpreter: python + torch
        print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                          "seconds": 0.0, "written_bytes": 0}))
        return
    import transformers
    import transformers.models.llama.modeling_llama  # noqa: F401  (lazy import every merge pays)

    import engine.export.gguf  # noqa: F401
    import engine.export.stream_merge  # noqa: F401
    from engine.export.merge import merge

    transformers.utils.logging.disable_progress_bar()
    out = os.path.join(directory, "merged")
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    if mode != "import-only":
        merge(os.path.join(directory, "model"), os.path.join(directory, "adapter"), out, drift="off",
              gguf="q4_0" if "gguf" in mode else None, streamed=False if mode == "in memory" else None)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    written = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) if os.path.isdir(out) else 0
    print(json.dumps({"peak_rss_bytes": peak, "seconds": round(seconds, 2), "written_bytes": written}))


def main(quick: bool) -> None:
    env = {**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false"}

    def run(*args) -> dict:
        proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(args[:2])} failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    models = QUICK if quick else {k: {**BASE_SHAPE, "num_hidden_layers": n} for k, n in SIZES.items()}
    results = []
    for label, shape in models.items():
        with tempfile.TemporaryDirectory() as directory:
            ckpt = run("--build", directory, json.dumps(shape), str(SHARD_BYTES // 40 if quick else SHARD_BYTES))
            rows = [{"mode": mode, **run("--child", mode, directory)} for mode in MODES]
        idle, imports = rows[0]["peak_rss_bytes"], rows[1]["peak_rss_bytes"]
        for row in rows:
            row["over_idle_bytes"] = row["peak_rss_bytes"] - idle
            row["over_idle_per_checkpoint"] = round(row["over_idle_bytes"] / ckpt["checkpoint_bytes"], 3)
            row["over_imports_bytes"] = row["peak_rss_bytes"] - imports
        results.append({"model": label, "shape": shape, "checkpoint": ckpt, "rows": rows})
        print(json.dumps(results[-1]), flush=True)
    if quick:
        return
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "merge_memory.json"), "w") as f:
        json.dump({"results": results, "python": sys.version.split()[0]}, f, indent=2)
    lines = [
        "# Peak host memory and time of the merge",
        "",
        "Random Llama-shaped **bf16** checkpoints in ~50 MB shards, a random rank-16 LoRA adapter on every "
        "decoder linear; output in the base's dtype (bf16), no drift check (`drift=\"off\"`: the drift "
        "check loads the model whole on purpose). Each mode runs in a fresh process; *over idle* is its "
        "peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`) minus the peak of an idle interpreter (python + "
        "`import torch`); *x checkpoint* divides that by the checkpoint's size on disk; *over imports* "
        "subtracts instead the peak of a process that imported torch, transformers and engine.export (the "
        "part that grows with the model; the rest is the merge's fixed cost: transformers' modules, the "
        "tokenizer, bitsandbytes).",
        "",
        "| model | params | checkpoint MB | shards (largest MB) | mode | peak RSS MB | over idle MB | x checkpoint | "
        "over imports MB | s |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        c = res["checkpoint"]
        for r in res["rows"]:
            lines.append(f"| {res['model']} ({res['shape']['num_hidden_layers']} layers) | {c['params']:,} | "
                         f"{_mb(c['checkpoint_bytes'])} | {c['shards']} ({_mb(c['largest_shard_bytes'])}) | {r['mode']} | "
                         f"{_mb(r['peak_rss_bytes'])} | {_mb(r['over_idle_bytes'])} | {r['over_idle_per_checkpoint']} | "
                         f"{_mb(r['over_imports_bytes'])} | {r['seconds']} |")
    lines += ["", "Generated by `python benchmarks/merge_memory.py` (CPU only; 2 shared cores, so times are noisy)."]
    with open(os.path.join(RESULTS, "merge_memory.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 5 and sys.argv[1] == "--build":
        print(json.dumps(build(sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]))))
    else:
        main(quick="--quick" in sys.argv)
