"""TRL as the oracle (a dev dependency, imported in tests only): for the same tiny model, LoRA
weights and pairs, the engine's DPO and ORPO losses, rewards and LoRA gradients match TRL's.

The pairs go through the engine's own pipeline (chat template, reply-token labels, packed rows);
TRL gets the same token ids as prompt_ids / chosen_ids / rejected_ids through its own collator
(padded rows, completion mask), so the test covers which tokens are summed as well as the math.
The reference model is the base with adapters off on both sides (TRL: ref_model=None + PEFT, its
"ref" adapter copy removed so the reference is the base, as in the engine)."""

import json
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import lora_and_peft_twins, make_tiny_model
from engine.config import DataConfig
from engine.preference.batches import make_pair_loader
from engine.preference.data import load_pair_dataset
from engine.preference.objective import DPOObjective, ORPOObjective

peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")

PAIRS = [
    {"prompt": "count to 3", "chosen": "1 2 3", "rejected": "no"},
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "The capital of France is Rome, I think."},
    {"prompt": [{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": "hello"}],
     "chosen": [{"role": "assistant", "content": "Hello, how are you today?"}],
     "rejected": [{"role": "assistant", "content": "fox"}]},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    base, tok = make_tiny_model("llama", seed=1)
    ours, theirs = lora_and_peft_twins(base, seed=7)
    path = tmp / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    ds = load_pair_dataset(str(path), tok, DataConfig(train_path=str(path), max_seq_len=64, cache_dir=str(tmp / "c")))
    return SimpleNamespace(ours=ours, theirs=theirs, tok=tok, ds=ds, tmp=tmp)


def _trl_examples(ds):
    """Our pair documents as TRL's tokenized columns: prompt = up to the first reply token,
    completion = the reply tokens (through the end-of-turn token, the last labelled one)."""
    out = []
    for d in ds.docs:
        s = d["split"]
        sides = [(d["input_ids"][:s], d["labels"][:s]), (d["input_ids"][s:], d["labels"][s:])]
        cut = []
        for ids, labels in sides:
            lab = [i for i, y in enumerate(labels) if y != -100]
            first, last = lab[0] + 1, lab[-1] + 1  # labels are shifted: position t predicts t + 1
            assert lab == list(range(lab[0], lab[-1] + 1)), "one contiguous reply per side"
            cut.append((ids[:first], ids[first:last + 1]))
        assert cut[0][0] == cut[1][0], "both sides share the prompt tokens"
        out.append({"prompt_ids": cut[0][0], "chosen_ids": cut[0][1], "rejected_ids": cut[1][1]})
    return out


def _engine_batch(ds, tok):
    loader = make_pair_loader(ds, max_seq_len=64, micro_batch_size=8, packing=True, seed=0,
                              pad_token_id=tok.pad_token_id, shuffle=False)
    batches = list(loader.one_pass())
    assert len(batches) == 1
    return batches[0]


def _grads(model, prefix=""):
    return {n.removeprefix(prefix).replace(".default", ""): p.grad.clone()
            for n, p in model.named_parameters() if p.requires_grad}


def _zero(model):
    for p in model.parameters():
        p.grad = None


def test_dpo_sigmoid_matches_trl(setup):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    beta = 0.3
    args = DPOConfig(output_dir=str(setup.tmp / "trl"), per_device_train_batch_size=len(PAIRS), beta=beta,
                     loss_type="sigmoid", report_to=[], use_cpu=True, save_strategy="no")
    trainer = DPOTrainer(model=setup.theirs, args=args, processing_class=setup.tok,
                         train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    if "ref" in trainer.model.peft_config:  # TRL copies a given adapter as the reference; ours is the base
        trainer.model.delete_adapter("ref")
    inputs = trainer.data_collator(_trl_examples(setup.ds))
    batch = _engine_batch(setup.ds, setup.tok)
    P = batch["num_pairs"]

    _zero(setup.ours)
    loss_sum, metrics = DPOObjective(beta=beta, chunk_size=4).loss_sum(setup.ours.train(), batch)
    (loss_sum / P).backward()
    trainer.model.train()
    _zero(trainer.model)
    theirs = trainer._compute_loss(trainer.model, inputs, False)
    theirs.backward()

    assert theirs.item() > 0.1 and abs(theirs.item() - 0.6931) > 1e-3  # the policy is not the reference
    torch.testing.assert_close(loss_sum / P, theirs.detach(), atol=1e-5, rtol=1e-5)
    m = trainer._metrics["train"]
    for ours_key, trl_key in [("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                              ("reward_margin", "rewards/margins"), ("reward_accuracy", "rewards/accuracies"),
                              ("logps_chosen", "logps/chosen")]:
        assert metrics[ours_key].item() / P == pytest.approx(m[trl_key][-1], abs=1e-5), ours_key
    ours, ref = _grads(setup.ours), _grads(trainer.model, "base_model.model.")
    assert set(ours) == set(ref) and len(ours) > 10
    for name in ours:
        torch.testing.assert_close(ours[name], ref[name], atol=1e-6, rtol=1e-4, msg=name)
    assert max(g.abs().max().item() for g in ours.values()) > 1e-4


def test_orpo_matches_trl(setup):
    from trl.experimental.orpo import ORPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    beta = 0.25
    batch = _engine_batch(setup.ds, setup.tok)
    P = batch["num_pairs"]
    _zero(setup.ours)
    loss_sum, metrics = ORPOObjective(beta=beta, chunk_size=5).loss_sum(setup.ours.train(), batch)
    (loss_sum / P).backward()

    # TRL's ORPO math on the padded [chosen; rejected] batch: get_batch_logps (per-token average)
    # and odds_ratio_loss; the NLL term on the chosen reply tokens, averaged per pair (ORPO's
    # trainer in trl.experimental also counts the prompt tokens: the engine trains replies only).
    inputs = DataCollatorForPreference(pad_token_id=setup.tok.pad_token_id)(_trl_examples(setup.ds))
    model = setup.theirs.train()
    _zero(model)
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    avg = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    fake_self = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device="cpu"))
    or_terms, rc, rr, _, _ = ORPOTrainer.odds_ratio_loss(fake_self, avg[:P], avg[P:])
    theirs = (-avg[:P]).mean() - or_terms.mean()
    theirs.backward()

    torch.testing.assert_close(loss_sum / P, theirs.detach(), atol=1e-5, rtol=1e-5)
    assert metrics["rewards_chosen"].item() / P == pytest.approx(rc.mean().item(), abs=1e-6)
    assert metrics["rewards_rejected"].item() / P == pytest.approx(rr.mean().item(), abs=1e-6)
    ours, ref = _grads(setup.ours), _grads(model, "base_model.model.")
    for name in ours:
        torch.testing.assert_close(ours[name], ref[name], atol=1e-6, rtol=1e-4, msg=name)
