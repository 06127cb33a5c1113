"""The memory planner: predict a LoRA / QLoRA step's peak GPU memory from the model's config alone
(`python -m engine.plan`, docs/PLANNER.md).

    shapes.py   a model's block shape, known shapes, LoRA targets
    block.py    one decoder block per token: what it saves (by part), what its backward holds
    prediction.py  the per-token formulas, `predict`, and what a run config asks of it
    measure.py  measuring a real step (live bytes, saved activations): the formulas' ground truth
    report.py   the report table, `run_plan`, the docs' tables
"""

from engine.plan.measure import LiveBytes, batch_tensors, measure_step, saved_tensor_bytes
from engine.plan.prediction import (Breakdown, auto_micro_batch_size, max_micro_batch, max_seq_len, plan_settings,
                                 predict, predict_for)
from engine.plan.report import answers_markdown, format_report, make_report, run_plan
from engine.plan.shapes import (GIB, KNOWN_SHAPE_NAMES, SUPPORTED, PlanError, Shape, known_config,
                                load_model_config, model_shape)

__all__ = ["Breakdown", "GIB", "KNOWN_SHAPE_NAMES", "LiveBytes", "PlanError", "SUPPORTED", "Shape",
           "answers_markdown", "auto_micro_batch_size", "batch_tensors", "format_report", "known_config",
           "load_model_config", "make_report", "max_micro_batch", "max_seq_len", "measure_step", "model_shape",
           "plan_settings", "predict", "predict_for", "run_plan", "saved_tensor_bytes"]
