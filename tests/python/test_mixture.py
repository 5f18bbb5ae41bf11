"""Mixture: one global stream for every world size, worker count and resume."""
import math
import os

import numpy as np
import pytest
import torch

import torch_lmdb

OFFSETS = {"sim": 0, "measured": 10_000, "scene": 20_000}
SIZES = {"sim": 120, "measured": 45, "scene": 31}


@pytest.fixture
def sources(tmp_path):
    """Three databases whose `index` field tells the source (by offset) and the sample."""
    out = {}
    for name, n in SIZES.items():
        path = str(tmp_path / name)
        with torch_lmdb.LMDBWriter(path) as w:
            for i in range(n):
                w.write({"index": OFFSETS[name] + i, "x": np.full(3, i, np.float32), "scene": f"{name}-{i % 3}"})
        out[name] = path
    return out


def stream(batches):
    return [(s, i) for b in batches for s, i in zip(b["source"].tolist(), b["index"].tolist())]


def ranks_stream(mixture, world, batch_size, epoch=0, start=0, num_workers=0, use_loader=True):
    """The global stream read by `world` ranks, each batch step's rank batches in rank order."""
    per_rank = []
    for rank in range(world):
        if use_loader:
            loader = torch_lmdb.make_loader(mixture, batch_size, shuffle=True, seed=11, rank=rank, world_size=world,
                                            num_workers=num_workers)
            loader.load_state_dict({"seed": 11, "epoch": epoch, "position": start, "num_samples": len(mixture),
                                    "order": "shuffle"})
            per_rank.append(list(loader))
        else:
            per_rank.append(list(mixture.iter_batches(batch_size, shuffle=True, seed=11, epoch=epoch, rank=rank,
                                                      world_size=world, start=start)))
    steps = zip(*per_rank)
    return [pair for step in steps for pair in stream(step)]


def test_batches_carry_the_source_and_every_sample_is_its_source(sources):
    m = torch_lmdb.Mixture(sources, {"sim": 0.5, "measured": 0.3, "scene": 0.2})
    b = m.read(range(64))
    assert b["source"].dtype == torch.int64 and b["x"].shape == (64, 3)
    for s, i, x, scene in zip(b["source"].tolist(), b["index"].tolist(), b["x"][:, 0].tolist(), b["scene"]):
        name = m.names[s]
        assert OFFSETS[name] <= i < OFFSETS[name] + SIZES[name]
        assert x == i - OFFSETS[name] and scene == f"{name}-{(i - OFFSETS[name]) % 3}"


def test_global_stream_is_the_same_for_every_world_size_and_worker_count(sources):
    m = torch_lmdb.Mixture(sources, [0.5, 0.3, 0.2], epoch_size=600)
    reference = ranks_stream(m, 1, 7)
    assert len(reference) == 600
    for world in (2, 3, 4, 6):
        assert ranks_stream(m, world, 7) == reference, world
    assert ranks_stream(m, 1, 7, num_workers=2) == reference
    assert ranks_stream(m, 3, 7, use_loader=False) == reference  # C++ BatchStream (StreamOptions::mixture)
    # Another epoch is another stream.
    assert ranks_stream(m, 1, 7, epoch=1) != reference


def test_mid_epoch_change_from_four_ranks_to_three_continues_the_stream(sources):
    m = torch_lmdb.Mixture(sources, [0.5, 0.3, 0.2], epoch_size=600)
    reference = ranks_stream(m, 1, 7)
    loaders = [torch_lmdb.make_loader(m, 7, shuffle=True, seed=11, rank=r, world_size=4) for r in range(4)]
    iters = [iter(loader) for loader in loaders]
    first = []
    for _ in range(5):
        first += stream([next(it) for it in iters])
    state = loaders[0].state_dict()
    assert state["position"] == 5 * 28 and all(loader.state_dict() == state for loader in loaders)
    rest = ranks_stream(m, 3, 7, start=state["position"])
    assert first + rest == reference
    # iter_batches' state resumes the same way (O(1): the position is located, nothing replayed).
    it = m.iter_batches(7, shuffle=True, seed=11, rank=1, world_size=4)
    next(it)
    moved = m.iter_batches(7, shuffle=True, seed=0, rank=0, world_size=1)
    moved.load_state_dict(it.state_dict())
    assert stream(moved) == reference[28:]


def test_stratified_global_batches_hold_floor_or_ceil_of_each_source(sources):
    weights = [0.5, 0.3, 0.2]
    m = torch_lmdb.Mixture(sources, weights, stratified=True, block_size=40, epoch_size=4000)
    batches = [list(step) for step in zip(*[list(torch_lmdb.make_loader(m, 10, shuffle=True, seed=2, rank=r,
                                                                        world_size=4)) for r in range(4)])]
    assert len(batches) == 100
    for step in batches:
        counts = torch.bincount(torch.cat([b["source"] for b in step]), minlength=3).tolist()
        for c, w in zip(counts, weights):
            assert math.floor(w * 40) <= c <= math.ceil(w * 40)


def test_random_draws_follow_the_weights_chi_square(sources):
    weights = [0.5, 0.3, 0.2]
    m = torch_lmdb.Mixture(sources, weights, epoch_size=1_000_000)
    source, _ = m.locate(0, 1_000_000, seed=5)
    counts = torch.bincount(source, minlength=3).double()
    expected = torch.tensor(weights, dtype=torch.float64) * 1e6
    assert float(((counts - expected) ** 2 / expected).sum()) < 9.21  # chi-square, 2 dof, 1 %


def test_each_source_is_a_permutation_then_a_new_one(sources):
    m = torch_lmdb.Mixture(sources, [0.2, 0.2, 0.6], epoch_size=300)
    b = m.read(range(300), seed=1)
    scene = [i - OFFSETS["scene"] for s, i in zip(b["source"].tolist(), b["index"].tolist()) if s == 2]
    n = SIZES["scene"]
    assert len(scene) > 2 * n
    assert sorted(scene[:n]) == list(range(n)) and sorted(scene[n:2 * n]) == list(range(n))
    assert scene[:n] != scene[n:2 * n]
    # The cursors count the positions drawn from each source so far.
    assert m.cursors(300, seed=1) == torch.bincount(b["source"], minlength=3).tolist()


def test_fields_must_agree_or_be_picked(sources, tmp_path):
    other = str(tmp_path / "other")
    with torch_lmdb.LMDBWriter(other) as w:
        for i in range(10):
            w.write({"index": 30_000 + i, "x": np.zeros(5, np.float32)})
    with pytest.raises(ValueError, match="the sources' fields differ.*fields="):
        torch_lmdb.Mixture({"sim": sources["sim"], "other": other})
    with pytest.raises(KeyError, match="scene"):
        torch_lmdb.Mixture({"sim": sources["sim"], "other": other}, fields=["index", "scene"])
    m = torch_lmdb.Mixture({"sim": sources["sim"], "other": other}, [0.5, 0.5], fields=["index", "x"])
    with pytest.raises(ValueError, match="field 'x' has shape .*pad=True"):
        m.read(range(40))
    padded = torch_lmdb.Mixture({"sim": sources["sim"], "other": other}, [0.5, 0.5], fields=["index", "x"], pad=True)
    b = padded.read(range(40))
    assert b["x"].shape == (40, 5) and sorted(b) == ["index", "source", "x"]
    # Two schemas: iter_batches reads through Python threads, the same stream as read().
    it = padded.iter_batches(8, shuffle=True, seed=3)
    assert stream(it)[:40] == stream([padded.read(range(40), seed=3)])
    short = b["x"][b["source"] == 0]
    assert (short[:, 3:] == 0).all()
    with pytest.raises(ValueError, match="weights"):
        torch_lmdb.Mixture(sources, [1.0, 2.0])
    with pytest.raises(ValueError, match="block shuffle does not apply"):
        next(iter(torch_lmdb.make_loader(torch_lmdb.Mixture(sources), 4, shuffle=True, block_size=8)))


def test_a_stored_selection_is_a_source(sources):
    torch_lmdb.LMDBDataset(sources["sim"]).filter(lambda b: b["index"] % 10 != 0, fields=["index"], name="no-tens")
    sim = torch_lmdb.LMDBDataset(sources["sim"], selection="no-tens")
    m = torch_lmdb.Mixture({"sim": sim, "scene": sources["scene"]}, [0.7, 0.3], epoch_size=500)
    got = stream(torch_lmdb.make_loader(m, 50, shuffle=True, seed=4))
    sim_ids = [i for s, i in got if s == 0]
    assert len(sim_ids) > 300 and all(i % 10 != 0 for i in sim_ids)
    assert set(sim_ids) == {i for i in range(120) if i % 10}
