"""The throughput benchmark still runs end to end: a tiny random Llama, engine vs HF + PEFT, one
timed step each in fresh processes (the GPU paths are what `scripts/gpu_check.sh --dry-run`
tries on a CPU; not part of the suite)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_throughput_benchmark_runs_engine_and_hf_on_a_tiny_model(tmp_path, precision):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"), "--model", "shape:tiny-llama",
           "--data", "synthetic", "--seq-len", "128", "--configs", "engine,hf_padded", "--warmup", "1",
           "--steps", "1", "--repeats", "1", "--timeout", "240", "--tag", "test", "--out-dir", str(tmp_path),
           "--precision", precision]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "throughput_test.json").read_text())
    assert result["meta"]["precision"] == precision
    rows = {r["config"]: r for r in result["rows"]}
    assert set(rows) == {"engine", "hf_padded"}
    for row in rows.values():
        assert "error" not in row, row
        assert row["useful_tokens_per_s"] > 0 and 0 < row["mfu"] < 1.5
    # both trained the same documents: the FLOP count per useful token is the same formula
    assert rows["engine"]["flops_per_useful_token"] == pytest.approx(rows["hf_padded"]["flops_per_useful_token"])
    assert rows["engine"]["packing"] is True  # the isolation probe, as engine.train runs it, keeps it packed
    assert (tmp_path / "throughput_test.md").read_text().count("| engine") == 1


def test_variants_benchmark_refuses_fewer_steps_than_the_warmup(capsys):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import variants

    with pytest.raises(SystemExit):
        variants.main(["--steps", "2"])
    assert "--steps must be >= 3 (the quickstart warms up for 2)" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--t4", "--device", "cuda", "--precision", "bf16"], "--t4 is fp16 (a T4 has no bf16); drop --precision bf16"),
    (["--precision", "fp16"], "--precision fp16 on a CPU: there are no fast fp16 matmul kernels there"),
])
def test_throughput_benchmark_refuses_precisions_the_hardware_lacks(argv, message, capsys):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import throughput

    with pytest.raises(SystemExit):
        throughput.main(argv)
    assert message in capsys.readouterr().err


def test_attention_benchmark_writes_both_rows(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import attention_cpu

    assert attention_cpu.main(["--lengths", "5,9,3", "--heads", "4", "--kv-heads", "2", "--head-dim", "8",
                               "--iters", "1", "--repeats", "1", "--tag", "test", "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "attention_cpu_test.json").read_text())
    assert [r["name"].split()[0] for r in result["rows"]] == ["SDPA", "ShortCausalAttention"]
    for row in result["rows"]:
        assert row["ms"] > 0 and all(0 < e < 0.05 for e in row["rel_err"].values()), row


def test_attention_benchmark_refuses_heads_that_do_not_group(capsys):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import attention_cpu

    with pytest.raises(SystemExit):
        attention_cpu.main(["--heads", "9", "--kv-heads", "2"])
    assert "--heads 9 is not a multiple of --kv-heads 2" in capsys.readouterr().err


def test_attention_memory_benchmark_writes_each_kernels_row(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import attention_memory

    assert attention_memory.main(["--tokens", "512", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                                  "--max-doc", "200", "--tag", "test", "--out-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "attention_memory_test.json").read_text())["rows"]
    assert [r["kernel"] for r in rows] == ["per_document", "short", "dense"]
    for r in rows:
        assert r["peak_bytes"] >= r["bare_bytes"] > 0 and r["ms"] > 0, r
    docs = rows[0]["documents"]
    assert (rows[0]["calls_forward"], rows[0]["calls_backward"]) == (docs, docs)  # one SDPA per document
    assert rows[2]["calls_forward"] == 1 and rows[2]["mask_bytes"] == 512 * 512


def test_gpu_attention_script_dry_run(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_attention

    assert gpu_attention.main(["--dry-run", "--tag", "test", "--out-dir", str(tmp_path)]) == 0
    row, = json.loads((tmp_path / "gpu_attention_test.json").read_text())["rows"]
    assert row["kernel"] == "per_document" and row["calls_forward"] == row["calls_backward"] > 0


@pytest.mark.slow
def test_long_context_probe_runs_with_tiles_and_packed_documents_on_a_cpu(tmp_path):
    """benchmarks/throughput.py --probe with the tiled MLP and norms, three documents per row: the
    GPU check's long-context step, on a tiny shape (a CPU never runs out of memory: it reaches the max)."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"), "--probe", "--model", "shape:tiny-llama",
           "--method", "qlora", "--probe-start", "256", "--probe-max", "512", "--mlp-tile-tokens", "auto",
           "--norm-tile-tokens", "64", "--docs-per-row", "3", "--timeout", "240", "--tag", "test",
           "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "throughput_test.json").read_text())
    assert result["max_fitting_seq_len"] == 512 and result["docs_per_row"] == 3
    assert (result["mlp_tile_tokens"], result["norm_tile_tokens"]) == ("auto", 64)
    assert [t["seq_len"] for t in result["tries"]] == [256, 512]
    assert all(t["predicted_dominant"] for t in result["tries"])


def test_tiling_benchmark_plans_the_8b_at_48k():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import tiling_memory

    rows = {r["config"]: r for r in tiling_memory.llama_8b_answers()}
    assert list(rows) == ["untiled", "tiled MLP", "tiled MLP + norms"]
    assert not rows["untiled"]["fits"] and rows["tiled MLP + norms"]["fits"]
    assert rows["untiled"]["longest"] < rows["tiled MLP"]["longest"] < rows["tiled MLP + norms"]["longest"]


@pytest.mark.slow
def test_rollout_generation_benchmark_runs_engine_and_generate_on_a_tiny_model(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "rollout_generation.py"), "--model", "shape:tiny-llama",
           "--prompts", "2", "--generations", "2", "--prompt-len", "12", "--completion-len", "6", "--repeats", "1",
           "--configs", "engine,engine_noshare,hf_generate", "--tag", "test", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "rollout_generation_test.json").read_text())
    rows = {r["config"]: r for r in result["rows"]}
    assert set(rows) == {"engine", "engine_noshare", "hf_generate"}
    assert rows["hf_generate"]["speedup_vs_hf_generate"] == 1.0
    assert all(r["tokens_per_s"] > 0 for r in rows.values())
    assert result["meta"]["prompts"] * result["meta"]["generations"] == 4
    assert "| engine |" in (tmp_path / "rollout_generation_test.md").read_text()


def test_rollout_generation_benchmark_refuses_bad_options(capsys):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import rollout_generation

    for argv, message in ((["--configs", "engine,vllm"], "--configs: unknown ['vllm']"),
                          (["--precision", "fp16"], "--precision fp16 on a CPU"),
                          (["--generations", "0"], "must be >= 1"),
                          (["--stop", "natural", "--model", "shape:tiny-llama"], "--stop natural needs a real model")):
        with pytest.raises(SystemExit):
            rollout_generation.main(argv)
        assert message in capsys.readouterr().err


def test_host_cost_benchmark_counts_ops_per_step_and_layer(tmp_path):
    """benchmarks/host_cost.py on a 3-layer skeleton: both configurations timed and counted, the
    fused blocks in the engine's plan, fewer ops per layer than transformers + PEFT."""
    import json

    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "host_cost.py"), "--layers", "3", "--hidden", "32",
           "--steps", "1", "--repeats", "1", "--tag", "t", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "host_cost_t.json").read_text())
    assert "fused_blocks" in result["plan"] and "row_attention" in result["plan"]
    engine, hf = result["configs"]["engine"], result["configs"]["hf_peft"]
    assert engine["ops_per_layer"] < hf["ops_per_layer"] and engine["aten_ops_per_step"] < hf["aten_ops_per_step"]
    for c in (engine, hf):  # GEMM and attention CPU time split off the step's: parts of it
        assert c["gemm_calls"] > 0 and 0 < c["gemm_cpu_ms"] and c["attention_cpu_ms"] >= 0
        assert c["other_cpu_ms"] == c["cpu_ms_per_step"] - c["gemm_cpu_ms"] - c["attention_cpu_ms"]
    assert engine["gemm_calls"] < hf["gemm_calls"]
    assert (tmp_path / "host_cost_t.md").read_text().count("|") > 20
    assert result["cuda_graphs"] is False and result["graph_counts"] is None   # the eager rows
    assert "eager (no CUDA graphs)" in (tmp_path / "host_cost_t.md").read_text()


def test_host_cost_refuses_cuda_graphs_on_a_cpu(capsys):
    """--cuda-graphs replays captured GPU work: on a CPU a clear refusal, not an eager row under its name."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import host_cost

    with pytest.raises(SystemExit) as exit_info:
        host_cost.main(["--cuda-graphs"])
    assert exit_info.value.code == 2 and "--cuda-graphs needs --device cuda" in capsys.readouterr().err
    import torch

    cuda = torch.device("cuda")   # a GPU whose plan leaves the switch off (here: no GPU, no flash varlen) says why
    with pytest.raises(SystemExit, match="this run's plan leaves cuda_graphs off: .*cuda_graphs off: needs flash"):
        host_cost.gpu_plan((), "bf16", cuda, cuda_graphs=True)
    assert not host_cost.gpu_plan((), "bf16", cuda).cuda_graphs   # the eager rows


def test_host_cost_skeleton_of_phi3_mini_resamples_its_longrope_factors_and_builds():
    """Phi-3-mini's longrope factors (one per rotary pair of head_dim 96) follow the shrunk head
    (head_dim 16: 8 pairs), so its rotary module builds."""
    import argparse

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import host_cost
    import torch
    from transformers import AutoModelForCausalLM

    args = argparse.Namespace(shape="phi-3-mini", family=None, layers=1, hidden=64, head_dim=16, vocab=256)
    config = host_cost.skeleton_config(args)
    rope = config.rope_parameters
    assert len(rope["short_factor"]) == len(rope["long_factor"]) == 8
    model = AutoModelForCausalLM.from_config(config)
    assert model(input_ids=torch.zeros(1, 4, dtype=torch.long)).logits.shape == (1, 4, 256)


@pytest.mark.slow
def test_grpo_step_benchmark_runs_engine_and_trl_on_a_tiny_model(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "grpo_step.py"), "--model", "tiny", "--prompts", "2",
           "--generations", "2", "--completion-len", "4", "--steps", "1", "--tag", "test", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "grpo_step_test.json").read_text())
    rows = {r["config"]: r for r in result["rows"]}
    assert set(rows) == {"engine", "trl"}
    assert rows["trl"]["speedup_vs_trl"] == 1.0 and rows["engine"]["speedup_vs_trl"] > 0
    for row in rows.values():
        assert len(row["timed_steps_ms"]) == 1 and row["ms_per_step"] > 0
        assert row["mean_completion_length"] and all(n == 4 for n in row["mean_completion_length"])  # no early stop
    assert "| engine |" in (tmp_path / "grpo_step_test.md").read_text()


def test_grpo_step_benchmark_refuses_bad_options(capsys):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import grpo_step

    for argv, message in ((["--configs", "engine,unsloth"], "--configs: unknown ['unsloth']"),
                          (["--steps", "0"], "must be >= 1"),
                          (["--generations", "1"], "--generations must be >= 2")):
        with pytest.raises(SystemExit):
            grpo_step.main(argv)
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_grpo_update_benchmark_writes_both_rows_on_a_tiny_model(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from throughput_inputs import tiny_dir

    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "grpo_update.py"), "--synthetic", "4", "--repeats", "1",
           "--precision", "fp32", "--tag", "test", "--out-dir", str(tmp_path), f"model.path={tiny_dir()}",
           "speed.self_check=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["config"]: r for r in json.loads((tmp_path / "grpo_update_test.json").read_text())["rows"]}
    assert set(rows) == {"unshared", "shared"}
    assert rows["shared"]["tokens_per_update"] < rows["unshared"]["tokens_per_update"]
    assert rows["shared"]["loss"] == pytest.approx(rows["unshared"]["loss"], rel=1e-4, abs=1e-6)
    assert "| shared |" in (tmp_path / "grpo_update_test.md").read_text()
