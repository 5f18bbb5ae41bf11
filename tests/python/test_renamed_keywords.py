"""The five read-ahead knobs' old Python keywords (readahead, lookahead, lookahead_bytes, prefetch)
still work for a release: each raises a DeprecationWarning naming its new keyword and behaves as
the new one (docs/ARCHITECTURE.md, glossary)."""

import warnings

import pytest
import torch

import torch_lmdb


def batches(it):
    return [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in it]


def same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k]


@pytest.mark.parametrize("old, new, value", [
    ("readahead", "os_readahead", True),
    ("lookahead", "page_requests", "always"),
    ("lookahead_bytes", "page_request_bytes", 1 << 20),
])
def test_an_old_dataset_keyword_warns_naming_the_new_one_and_sets_the_same_option(make_db, old, new, value):
    path = make_db(20)
    with pytest.warns(DeprecationWarning, match=rf"{old}= is deprecated .* use {new}="):
        ds_old = torch_lmdb.LMDBDataset(path, **{old: value})
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        ds_new = torch_lmdb.LMDBDataset(path, **{new: value})
    assert ds_old._options == ds_new._options and ds_old._options[new] == value
    same_batches([ds_old.get_batch([3, 1, 7])], [ds_new.get_batch([3, 1, 7])])
    ds_old.close()
    ds_new.close()


def test_old_page_request_keywords_request_pages_as_the_new_ones_do(make_db):
    path = make_db(64)
    with pytest.warns(DeprecationWarning, match="page_requests="):
        old = torch_lmdb.LMDBDataset(path, lookahead="always")
    new = torch_lmdb.LMDBDataset(path, page_requests="always")
    for ds in (old, new):
        ds.get_batch(list(range(0, 64, 3)))
    a, b = old.io_stats(), new.io_stats()
    assert a["page_request_batches"] == b["page_request_batches"] == 1
    # the counters' old names hold the same counts for a release
    for stats in (a, b):
        assert stats["lookahead_batches"] == stats["page_request_batches"]
        assert stats["prefetches"] == stats["request_pages_calls"]
        assert stats["pages_prefetched"] == stats["pages_requested_ahead"]
    never = torch_lmdb.LMDBDataset(path, page_requests="never")
    never.get_batch([1, 2])
    assert never.io_stats()["page_request_batches"] == 0


def test_the_old_prefetch_keyword_of_iter_batches_warns_and_reads_the_same_epoch(make_db):
    ds = torch_lmdb.LMDBDataset(make_db(50))
    with pytest.warns(DeprecationWarning, match=r"prefetch= is deprecated .* use batches_ahead="):
        old = batches(ds.iter_batches(8, shuffle=True, seed=3, prefetch=3, threads=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        new = batches(ds.iter_batches(8, shuffle=True, seed=3, batches_ahead=3, threads=2))
    same_batches(old, new)
    # a check names the keyword as the caller wrote it
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="prefetch must be a positive int"):
        ds.iter_batches(8, prefetch=0)
    with pytest.raises(ValueError, match="batches_ahead must be a positive int"):
        ds.iter_batches(8, batches_ahead=0)


def test_dataset_checks_name_the_keyword_as_the_caller_wrote_it(make_db):
    path = make_db(4)
    with pytest.warns(DeprecationWarning), \
            pytest.raises(ValueError, match="^lookahead must be 'auto', 'always' or 'never'"):
        torch_lmdb.LMDBDataset(path, lookahead="sometimes")
    with pytest.raises(ValueError, match="^page_requests must be 'auto', 'always' or 'never'"):
        torch_lmdb.LMDBDataset(path, page_requests="sometimes")
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="^lookahead_bytes must be an int >= 0"):
        torch_lmdb.LMDBDataset(path, lookahead_bytes=-1)
    with pytest.raises(ValueError, match="^page_request_bytes must be an int >= 0"):
        torch_lmdb.LMDBDataset(path, page_request_bytes=-1)


def test_the_old_prefetch_keyword_of_a_mixture_warns_and_reads_the_same_epoch(make_db):
    sources = {"a": make_db(30, name="a"), "b": make_db(20, name="b", first=100)}
    m = torch_lmdb.Mixture(sources, [0.5, 0.5], epoch_size=40)
    with pytest.warns(DeprecationWarning, match="batches_ahead="):
        old = batches(m.iter_batches(8, shuffle=True, seed=1, prefetch=1))
    new = batches(m.iter_batches(8, shuffle=True, seed=1, batches_ahead=1))
    same_batches(old, new)


def test_an_old_keyword_with_its_new_name_is_a_type_error(make_db):
    path = make_db(4)
    with pytest.raises(TypeError, match="readahead= is the old name of os_readahead="):
        torch_lmdb.LMDBDataset(path, readahead=True, os_readahead=True)
    ds = torch_lmdb.LMDBDataset(path)
    with pytest.raises(TypeError, match="prefetch= is the old name of batches_ahead="):
        ds.iter_batches(2, prefetch=2, batches_ahead=2)


def test_the_renamed_dataset_still_pickles_and_reopens(make_db):
    import pickle

    path = make_db(10)
    with pytest.warns(DeprecationWarning):
        ds = torch_lmdb.LMDBDataset(path, readahead=True, lookahead="never")
    again = pickle.loads(pickle.dumps(ds))
    assert again._options["os_readahead"] is True and again._options["page_requests"] == "never"
    assert int(again[9]["index"]) == 9


def test_a_dataset_pickled_with_the_old_option_names_opens(make_db):
    import pickle

    ds = torch_lmdb.LMDBDataset(make_db(6), os_readahead=True, page_requests="never", page_request_bytes=1 << 20)
    state = ds.__getstate__()
    options = state["_options"]
    for old, new in (("readahead", "os_readahead"), ("lookahead", "page_requests"),
                     ("lookahead_bytes", "page_request_bytes")):
        options[old] = options.pop(new)
    old = torch_lmdb.LMDBDataset.__new__(torch_lmdb.LMDBDataset)
    old.__setstate__(state)
    again = pickle.loads(pickle.dumps(old))
    assert again._options["os_readahead"] is True and again._options["page_requests"] == "never"
    assert again._options["page_request_bytes"] == 1 << 20 and "readahead" not in again._options
    assert int(again[5]["index"]) == 5
