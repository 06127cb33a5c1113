"""Packing, padding, deterministic order, resume from state_dict, rank shares."""

import random

import pytest
import torch

from engine.data import make_loader, pack_documents
from engine.data.loader import packing_efficiency


class Docs:
    """A stand-in TokenizedDataset: documents of given lengths with distinct token values."""

    def __init__(self, lengths, seed=0):
        rng = random.Random(seed)
        self.docs = []
        for i, n in enumerate(lengths):
            ids = [rng.randrange(3, 100) for _ in range(n)]
            labels = ids[1:] + [-100]
            labels[0] = -100  # some prompt-like positions
            self.docs.append({"input_ids": ids, "labels": labels, "source_line": i + 1})


LENGTHS = [5, 17, 9, 32, 3, 11, 20, 7, 30, 2, 16, 16, 8, 25, 4, 13]


def _loader(docs=None, **kw):
    args = dict(max_seq_len=32, micro_batch_size=2, packing=True, seed=0, pad_token_id=0)
    args.update(kw)
    return make_loader(docs or Docs(LENGTHS), **args)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k


def test_best_fit_decreasing():
    rows = pack_documents(LENGTHS, 32)
    assert sorted(i for r in rows for i in r) == list(range(len(LENGTHS)))
    assert all(sum(LENGTHS[i] for i in r) <= 32 for r in rows)
    assert sum(LENGTHS) == 218 and len(rows) == 7  # optimal here: ceil(218 / 32) rows
    assert packing_efficiency(LENGTHS, 32) == pytest.approx(218 / (7 * 32))
    with pytest.raises(ValueError, match="document 1 has 40 tokens > max_seq_len 32"):
        pack_documents([3, 40], 32)


def test_packed_batch_layout():
    docs = Docs(LENGTHS)
    loader = _loader(docs)
    seen = []
    for rows, batch in zip(loader.plan(0), loader.epoch_batches(0)):
        assert "attention_mask" not in batch
        B, T = batch["input_ids"].shape
        assert B == len(rows) and T == max(sum(LENGTHS[i] for i in r) for r in rows) <= 32
        for b, row in enumerate(rows):
            t = 0
            for i in row:
                n = LENGTHS[i]
                assert batch["input_ids"][b, t:t + n].tolist() == docs.docs[i]["input_ids"]
                assert batch["labels"][b, t:t + n].tolist() == docs.docs[i]["labels"]
                assert batch["position_ids"][b, t:t + n].tolist() == list(range(n))
                assert batch["labels"][b, t + n - 1] == -100  # never predict the next document
                t += n
                seen.append(i)
            assert (batch["input_ids"][b, t:] == 0).all() and (batch["labels"][b, t:] == -100).all()
            assert batch["position_ids"][b, t:].tolist() == list(range(T - t))  # padding: one more "document"
        assert batch["num_tokens"] == sum(LENGTHS[i] for r in rows for i in r)
        assert batch["num_loss_tokens"] == int((batch["labels"] != -100).sum())
        assert batch["input_ids"].dtype == batch["labels"].dtype == batch["position_ids"].dtype == torch.long
    assert sorted(seen) == list(range(len(LENGTHS)))


def test_padded_batch_layout():
    docs = Docs(LENGTHS)
    loader = _loader(docs, packing=False, micro_batch_size=3)
    seen = []
    for rows, batch in zip(loader.plan(0), loader.epoch_batches(0)):
        lens = [LENGTHS[r[0]] for r in rows]
        assert batch["input_ids"].shape == (len(rows), max(lens))
        assert batch["attention_mask"].tolist() == [[1] * n + [0] * (max(lens) - n) for n in lens]
        for b, (i,) in enumerate(rows):
            assert batch["input_ids"][b, :lens[b]].tolist() == docs.docs[i]["input_ids"]
            assert (batch["labels"][b, lens[b]:] == -100).all()
            seen.append(i)
        assert batch["num_tokens"] == sum(lens)
    assert sorted(seen) == list(range(len(LENGTHS)))


def test_same_seed_same_batches_other_seed_other_order():
    a, b, c = _loader(seed=1), _loader(seed=1), _loader(seed=2)
    for x, y in zip(_take(iter(a), 12), _take(iter(b), 12)):
        _same(x, y)
    assert a.plan(0) != c.plan(0)
    assert a.plan(0) != a.plan(1)  # reshuffled every epoch


def test_no_shuffle_is_stable_across_epochs():
    loader = _loader(shuffle=False, packing=False, micro_batch_size=4)
    assert loader.plan(0) == loader.plan(3)
    assert [r[0] for b in loader.plan(0) for r in b] == list(range(len(LENGTHS)))


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("stop", [1, 3, 4, 7])  # mid-epoch, at an epoch boundary, in the second epoch
def test_resume_from_state_dict(packing, stop):
    ref = _take(iter(_loader(packing=packing)), 12)
    first = _loader(packing=packing)
    it = iter(first)
    _take(it, stop)
    state = first.state_dict()
    restored = _loader(packing=packing)
    restored.load_state_dict(state)
    for x, y in zip(_take(iter(restored), 12 - stop), ref[stop:]):
        _same(x, y)
    assert len(first) == 4 if packing else len(first) == 8


def test_load_state_dict_checks_settings():
    state = _loader(seed=0).state_dict()
    with pytest.raises(ValueError, match="loader state key 'seed': checkpoint has 0, this loader has 5"):
        _loader(seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="'micro_batch_size'"):
        _loader(micro_batch_size=3).load_state_dict(state)


def test_epoch_batches_does_not_move_the_position():
    loader = _loader()
    it = iter(loader)
    _take(it, 2)
    before = loader.state_dict()
    assert len(list(loader.epoch_batches())) == len(loader) and len(list(loader.one_pass())) == len(loader)
    assert loader.state_dict() == before


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shares_disjoint_and_cover_the_epoch(packing, world_size):
    single = _loader(packing=packing, micro_batch_size=1)
    global_plan = single._global_plan(0)
    loaders = [_loader(packing=packing, micro_batch_size=1, rank=r, world_size=world_size) for r in range(world_size)]
    plans = [ld.plan(0) for ld in loaders]
    assert len({len(p) for p in plans}) == 1  # same number of steps on every rank
    n = len(global_plan) // world_size * world_size
    docs = [tuple(row) for p in plans for batch in p for row in batch]
    assert len(docs) == len(set(docs)) == n  # disjoint
    assert sorted(docs) == sorted(tuple(row) for batch in global_plan[:n] for row in batch)  # cover
    for r, p in enumerate(plans):
        assert p == global_plan[r:n:world_size]


def test_drop_last_and_bad_arguments():
    loader = _loader(packing=False, micro_batch_size=5, drop_last=True)
    assert all(len(b) == 5 for b in loader.plan(0)) and len(loader) == 3
    assert len(_loader(packing=False, micro_batch_size=5)) == 4
    with pytest.raises(ValueError, match="fewer batches than world_size=40"):
        _loader(world_size=40, rank=0)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        _loader(world_size=2, rank=2)
    with pytest.raises(ValueError, match="source line 4 has 32 tokens > max_seq_len 20"):
        _loader(max_seq_len=20)
    with pytest.raises(ValueError, match="pad_token_id is None"):
        _loader(pad_token_id=None)


def test_batches_per_epoch_is_the_same_every_epoch():
    rng = random.Random(3)
    lengths = [rng.choice([4, 8, 8, 12, 16, 31]) for _ in range(200)]
    for packing in (True, False):
        loader = _loader(Docs(lengths), packing=packing, micro_batch_size=3)
        assert {len(loader.plan(e)) for e in range(6)} == {len(loader)}
