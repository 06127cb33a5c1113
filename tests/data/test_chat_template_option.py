"""data.chat_template: saved with the adapter, and what generate and merge render with."""

from __future__ import annotations

import pytest
import torch

from engine.config import PeftConfig
from engine.export.adapter import adapter_chat_template, save_adapter
from engine.layers.inject import inject_lora
from engine.model.build import load_base_model
from tests.conftest import make_tiny_model_dir
from tests.data.conftest import CHATML_TOOLS


@pytest.mark.slow  # loads the tiny model three times and merges it
def test_template_travels_with_the_adapter_to_generate_and_merge(tmp_path):
    from engine.export.merge import merge
    from engine.generate import load_for_inference

    model_dir = make_tiny_model_dir(tmp_path)
    model = load_base_model(str(model_dir))
    torch.manual_seed(0)
    cfg = PeftConfig(r=4, alpha=8, targets=["q_proj"])
    inject_lora(model, cfg.targets, cfg.r, cfg.alpha)
    plain, trained = tmp_path / "plain", tmp_path / "trained"
    save_adapter(model, str(plain), cfg, base_model_name_or_path=str(model_dir))
    save_adapter(model, str(trained), cfg, base_model_name_or_path=str(model_dir), chat_template=CHATML_TOOLS)
    assert adapter_chat_template(str(plain)) is None
    assert (trained / "chat_template.jinja").read_text() == CHATML_TOOLS == adapter_chat_template(str(trained))

    _, tokenizer, _ = load_for_inference(str(model_dir), str(trained), device="cpu", precision="fp32")
    assert tokenizer.chat_template == CHATML_TOOLS
    _, tokenizer, _ = load_for_inference(str(model_dir), str(plain), device="cpu", precision="fp32")
    assert tokenizer.chat_template != CHATML_TOOLS

    merge(str(model_dir), str(trained), str(tmp_path / "merged"), drift="off")
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == CHATML_TOOLS
