"""Peak CPU memory of loading a sharded checkpoint: engine's streamed loader vs transformers.

Builds a random Llama-shaped fp32 checkpoint (~325 MB in 4 shards of <=100 MB) in a temp dir,
then loads it in fresh subprocesses and reports each child's peak RSS (getrusage ru_maxrss):
  import-only        python + torch + transformers (+ its Llama module) + bitsandbytes, nothing loaded
  engine lora        engine.model.build.load_base_model (meta skeleton + shard-by-shard streaming), fp32
  engine qlora       same, decoder linears quantized to NF4 (double quant) as they arrive
  hf from_pretrained transformers' own loader, fp32 (reference point, not used by the engine)
The claim checked: peak - import-only ~= the loaded model's size + at most one shard.
The checkpoint is written by a subprocess too, so this parent stays small: on Linux a child's
ru_maxrss starts from the parent's RSS at fork (the peak survives exec). Each child also reports
VmHWM / VmRSS from /proc/self/status as a cross-check.

    python benchmarks/load_memory.py            # writes benchmarks/results/load_memory.{json,md}
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
SHAPE = dict(vocab_size=16000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
             num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False)
SHARD_BYTES = 100 * 2**20
MODES = ("import-only", "engine lora", "engine qlora", "hf from_pretrained")


def _mib(n_bytes: float) -> float:
    return round(n_bytes / 2**20, 1)


def build_checkpoint(directory: str) -> dict:
    """Random fp32 Llama checkpoint in shards of <= SHARD_BYTES, written one shard at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from engine.model.build import params_on_meta

    config = LlamaConfig(**SHAPE)
    config.save_pretrained(directory)
    with params_on_meta():
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()
                  if k.endswith(("weight", "bias"))}
    gen = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        nbytes = 4 * torch.Size(shape).numel()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = shape
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: torch.randn(s, generator=gen) * 0.02 for k, s in shard.items()}
        save_file(tensors, os.path.join(directory, file), metadata={"format": "pt"})
        weight_map.update({k: file for k in shard})
        total += sum(t.numel() * 4 for t in tensors.values())
        del tensors
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    sizes = [os.path.getsize(os.path.join(directory, f)) for f in sorted(set(weight_map.values()))]
    return {"params": sum(torch.Size(s).numel() for s in shapes.values()), "checkpoint_bytes": sum(sizes),
            "shards": len(sizes), "largest_shard_bytes": max(sizes)}


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def child(mode: str, directory: str) -> None:
    """Runs in a fresh process: import, (load), print peak RSS and the loaded model's bytes as JSON."""
    import torch
    import bitsandbytes  # noqa: F401  (imported in every mode so the baseline is comparable)
    import transformers
    import transformers.models.llama.modeling_llama  # noqa: F401  (lazy import every loader pays)

    from engine.model.build import load_base_model
    from engine.layers.quant import QuantSpec

    transformers.utils.logging.disable_progress_bar()
    rss_after_import = _proc_status_bytes("VmRSS")
    start = time.perf_counter()
    model = None
    if mode == "engine lora":
        model = load_base_model(directory, dtype=torch.float32)
    elif mode == "engine qlora":
        model = load_base_model(directory, dtype=torch.float32, quant=QuantSpec("nf4", True, torch.float32))
    elif mode == "hf from_pretrained":
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    seconds = time.perf_counter() - start
    model_bytes = 0
    if model is not None:
        # Touch every tensor: a loader may leave weights as views of the memory-mapped checkpoint,
        # which count in RSS only once read (and training reads them all).
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                t.reshape(-1)[:: max(1, 4096 // t.element_size())].float().sum()  # one value per page
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        model_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
        for m in model.modules():  # 4-bit absmax constants live in the quant state, not in parameters
            qs = getattr(getattr(m, "weight", None), "quant_state", None)
            if qs is not None:
                model_bytes += qs.absmax.numel() * qs.absmax.element_size()
                if qs.state2 is not None:
                    model_bytes += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    print(json.dumps({"peak_rss_bytes": peak_kib * 1024, "vm_hwm_bytes": _proc_status_bytes("VmHWM"),
                      "rss_after_import_bytes": rss_after_import, "model_bytes": model_bytes,
                      "load_s": round(seconds, 2)}))


def main() -> None:
    os.makedirs(RESULTS, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false"}

    def run(*args) -> dict:
        out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True,
                             cwd=ROOT, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory() as directory:
        ckpt = run("--build", directory)
        rows = [{"mode": mode, **run("--child", mode, directory)} for mode in MODES]
    baseline = rows[0]["peak_rss_bytes"]
    for row in rows:
        row["over_import_bytes"] = row["peak_rss_bytes"] - baseline
        row["over_model_bytes"] = row["over_import_bytes"] - row["model_bytes"]
    result = {"checkpoint": ckpt, "shape": SHAPE, "rows": rows, "python": sys.version.split()[0]}
    with open(os.path.join(RESULTS, "load_memory.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [
        "# Peak CPU memory while loading a sharded checkpoint",
        "",
        f"Random Llama-shaped fp32 checkpoint: {ckpt['params']:,} params, {_mib(ckpt['checkpoint_bytes'])} MiB in "
        f"{ckpt['shards']} shards (largest {_mib(ckpt['largest_shard_bytes'])} MiB). Each mode runs in a fresh "
        "process; after loading, every tensor is read once (a lazily memory-mapped weight counts in RSS "
        "only when touched, and training touches all of them); peak RSS is `getrusage(RUSAGE_SELF).ru_maxrss`. *Over import* subtracts the import-only "
        "peak; *over model* further subtracts the bytes of the loaded model (params + buffers + 4-bit "
        "constants): that is the loader's transient overhead, to compare with one shard. The engine copies "
        "each tensor out of the memory-mapped shard (the model owns its memory; the shard's pages go when it "
        "closes), so its peak is about model + one shard; transformers keeps lazily mapped views of the file, "
        "which share pages with the page cache.",
        "",
        "| mode | peak RSS MiB | VmHWM MiB | over import MiB | loaded model MiB | over model MiB | load s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        hwm = _mib(r["vm_hwm_bytes"]) if r["vm_hwm_bytes"] else "n/a"
        lines.append(f"| {r['mode']} | {_mib(r['peak_rss_bytes'])} | {hwm} | {_mib(r['over_import_bytes'])} | "
                     f"{_mib(r['model_bytes'])} | {_mib(r['over_model_bytes'])} | {r['load_s']} |")
    lines.append("")
    lines.append("Generated by `python benchmarks/load_memory.py` (CPU only; 2 shared cores, so load times are noisy).")
    with open(os.path.join(RESULTS, "load_memory.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 3 and sys.argv[1] == "--build":
        print(json.dumps(build_checkpoint(sys.argv[2])))
    else:
        main()
