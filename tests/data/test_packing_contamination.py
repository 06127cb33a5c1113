"""Packed rows are contamination-free: every document's per-token losses in a packed batch equal
those of the document run alone (tiny random Llama, fp32, SDPA and eager), when the forward gets
position_ids, no attention_mask and use_cache=False (FIELD.md bug 2). The last tests show why
use_cache=False and "no mask" are required: without them the packed documents see each other."""

import pytest
import torch
import torch.nn.functional as F

from engine.data import load_dataset, make_loader

L = 48
# Different lengths; 48 fills a row exactly; several rows hold 2-4 documents.
LENGTHS = [48, 30, 18, 7, 25, 11, 40, 5, 3, 21, 16]


def _tiny_llama(vocab: int, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=None, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=torch.float32)
    with torch.no_grad():  # the default init (std 0.02) makes every logit alike; larger weights show leaks
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
    return model.eval()


class _Docs:
    def __init__(self, vocab):
        g = torch.Generator().manual_seed(1)
        self.docs = []
        for i, n in enumerate(LENGTHS):
            ids = torch.randint(3, vocab, (n,), generator=g).tolist()
            self.docs.append({"input_ids": ids, "labels": ids[1:] + [-100], "source_line": i + 1})


def _token_losses(logits, labels):
    """[T] per-token cross-entropy (0 where the label is -100)."""
    return F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="none")


def _packed_vs_alone(model, dataset, **forward_kwargs):
    """Max |packed - alone| over all documents, for per-token losses and log-probs."""
    loader = make_loader(dataset, max_seq_len=L, micro_batch_size=3, packing=True, seed=0, pad_token_id=0)
    worst_loss, worst_logp, n_docs, full_rows = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for rows, batch in zip(loader.plan(0), loader.epoch_batches(0)):
            assert "attention_mask" not in batch
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **forward_kwargs).logits
            for b, row in enumerate(rows):
                t = 0
                full_rows += sum(len(dataset.docs[i]["input_ids"]) for i in row) == L
                for i in row:
                    doc = dataset.docs[i]
                    n = len(doc["input_ids"])
                    alone = model(input_ids=torch.tensor([doc["input_ids"]]), use_cache=False).logits[0]
                    packed = out[b, t:t + n]
                    labels = torch.tensor(doc["labels"])
                    worst_loss = max(worst_loss, (_token_losses(packed, labels) - _token_losses(alone, labels)).abs().max().item())
                    worst_logp = max(worst_logp, (packed.log_softmax(-1) - alone.log_softmax(-1)).abs().max().item())
                    t += n
                    n_docs += 1
    assert n_docs == len(dataset.docs) and full_rows >= 1
    return worst_loss, worst_logp


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_alone(attn):
    vocab = 120
    model = _tiny_llama(vocab, attn)
    worst_loss, worst_logp = _packed_vs_alone(model, _Docs(vocab), use_cache=False)
    assert worst_loss < 1e-5 and worst_logp < 1e-5


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_alone_real_chat_documents(attn, tok, write_jsonl, cfg):
    """Same check on documents made by load_dataset (chat template, masked labels) with the
    test tokenizer's vocabulary."""
    rows = [{"messages": [{"role": "user", "content": "q" * k}, {"role": "assistant", "content": "a b " * k}]}
            for k in (1, 3, 6, 2)]
    ds = load_dataset(write_jsonl(rows), tok, cfg(max_seq_len=96), cache=False)
    model = _tiny_llama(len(tok), attn)
    loader = make_loader(ds, max_seq_len=96, micro_batch_size=1, packing=True, seed=0, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        for rows_, batch in zip(loader.plan(0), loader.epoch_batches(0)):
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
            t = 0
            for i in rows_[0]:
                doc = ds.docs[i]
                n = len(doc["input_ids"])
                alone = model(input_ids=torch.tensor([doc["input_ids"]]), use_cache=False).logits[0]
                labels = torch.tensor(doc["labels"])
                assert (_token_losses(out[t:t + n], labels) - _token_losses(alone, labels)).abs().max() < 1e-5
                t += n
    assert any(len(r[0]) > 1 for r in loader.plan(0))  # some row really holds several documents


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_default_use_cache_contaminates(attn):
    """Why the forward must pass use_cache=False: with the default the model builds a KV cache,
    transformers then ignores the packed position_ids for masking, and later documents attend
    to earlier ones in the row."""
    vocab = 120
    model = _tiny_llama(vocab, attn)
    worst_loss, _ = _packed_vs_alone(model, _Docs(vocab))
    assert worst_loss > 1e-2


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_all_ones_attention_mask_contaminates(attn):
    """Why packed batches carry no attention_mask: an all-ones mask turns the block-diagonal mask
    into a plain causal one over the whole row."""
    vocab = 120
    model = _tiny_llama(vocab, attn)

    class _Model:  # adds an all-ones mask of the batch's shape to every packed forward
        def __call__(self, input_ids, position_ids=None, **kw):
            if position_ids is not None:
                kw["attention_mask"] = torch.ones_like(input_ids)
            return model(input_ids=input_ids, position_ids=position_ids, **kw)

    worst_loss, _ = _packed_vs_alone(_Model(), _Docs(vocab), use_cache=False)
    assert worst_loss > 1e-2
