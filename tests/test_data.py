"""The demo corpus and its windows: deterministic, of the expected size, shifted by one byte."""

import time
from pathlib import PurePosixPath

import pytest
import torch

from lightning_fpq.demo.data import (
    CORPORA,
    DEFAULT_MAX_BYTES,
    STDLIB_FILES,
    VOCAB_SIZE,
    ByteCorpusDataModule,
    ByteWindowDataset,
    EpochSampler,
    _is_stdlib_module_source,
    corpus_info,
    load_corpus,
    split_corpus,
    stdlib_files,
)


def test_corpus_is_stdlib_source_of_the_requested_size():
    t = time.perf_counter()
    corpus = load_corpus()
    assert time.perf_counter() - t < 2.0
    info = corpus_info()
    assert corpus.dtype == torch.uint8 and corpus.dim() == 1
    assert corpus.numel() == info.total_bytes == DEFAULT_MAX_BYTES
    # The fixed list comes first, in its order (a trimmed install may lack some of its files
    # and fill up with others after them).
    names = [f for f, _ in info.files]
    listed = [f for f in STDLIB_FILES if f in names]
    assert names[: len(listed)] == listed and len(listed) > 10
    text = bytes(corpus[:20_000].tolist()).decode("utf-8")
    assert "def " in text and "class " in text
    assert VOCAB_SIZE == 256


def test_corpus_is_deterministic_and_cached_copies_are_independent():
    a, b = load_corpus(50_000), load_corpus(50_000)
    assert torch.equal(a, b)
    a[0] = 0
    assert not torch.equal(a, load_corpus(50_000))  # callers get fresh tensors
    assert torch.equal(load_corpus(50_000), load_corpus()[:50_000])  # a prefix of the larger corpus


def test_full_corpus_is_the_fixed_list_only():
    info = corpus_info(None)
    assert [f for f, _ in info.files] == [f for f in STDLIB_FILES if f in dict(info.files)]
    assert info.total_bytes > DEFAULT_MAX_BYTES
    assert "files" in info.short_str() and info.python_version.count(".") == 2


def test_default_corpus_is_the_demo_corpus():
    assert CORPORA == ("demo", "stdlib", "stdlib+torch")
    assert torch.equal(load_corpus(), load_corpus(corpus="demo"))
    assert corpus_info() == corpus_info(DEFAULT_MAX_BYTES, "demo")
    assert all(torch.equal(a, b) for a, b in zip(split_corpus(), split_corpus(corpus="demo")))


@pytest.mark.parametrize(
    ("rel", "expected"),
    [
        ("os.py", True),
        ("json/decoder.py", True),
        ("email/mime/text.py", True),
        ("test/test_os.py", False),
        ("test/support/__init__.py", False),
        ("lib2to3/tests/data/bom.py", False),
        ("idlelib/idle_test/htest.py", False),
        ("unittest/test/test_case.py", False),
        ("tkinter/test_tkinter_helper.py", False),
        ("site-packages/torch/__init__.py", False),
        ("config-3.11-x86_64-linux-gnu/python-config.py", False),
        ("README.txt", False),
    ],
)
def test_stdlib_selection_rule(rel, expected):
    assert _is_stdlib_module_source(PurePosixPath(rel)) is expected


def test_stdlib_corpus_is_every_non_test_module_in_sorted_order():
    files = stdlib_files()
    assert list(files) == sorted(files) and len(set(files)) == len(files)
    assert {"os.py", "json/decoder.py", "_pydecimal.py"} <= set(files)
    assert not any(f.startswith(("test/", "site-packages/")) or "/tests/" in f for f in files)
    info = corpus_info(None, "stdlib")
    assert [f for f, _ in info.files] == [f for f in files if dict(info.files).get(f)]  # empty files add nothing
    assert info.total_bytes > 4 * corpus_info(None).total_bytes  # far more than the demo's fixed list
    t = time.perf_counter()
    full = load_corpus(None, "stdlib")
    assert time.perf_counter() - t < 2.0  # cached
    assert full.numel() == info.total_bytes
    # max_bytes caps it to a prefix, and the demo corpus is not affected
    assert torch.equal(load_corpus(100_000, "stdlib"), full[:100_000])
    assert corpus_info(100_000, "stdlib").total_bytes == 100_000
    assert not torch.equal(load_corpus(100_000, "stdlib"), load_corpus(100_000))


def test_stdlib_corpus_split_holds_out_the_tail_of_every_file():
    train, val = split_corpus(None, val_fraction=0.1, corpus="stdlib")
    info = corpus_info(None, "stdlib")
    assert train.numel() + val.numel() == info.total_bytes
    assert val.numel() == sum(int(n * 0.1) for _, n in info.files)
    again_train, again_val = split_corpus(None, 0.1, "stdlib")
    assert torch.equal(train, again_train) and torch.equal(val, again_val)  # a fixed split


def test_stdlib_plus_torch_corpus_appends_the_installed_torch_source():
    """ "stdlib+torch": the "stdlib" corpus, byte for byte, then every non-test module of the
    installed torch package (same selection rule, sorted), about four times more text."""
    stdlib = corpus_info(None, "stdlib")
    info = corpus_info(None, "stdlib+torch")
    n = len(stdlib.files)
    assert info.files[:n] == stdlib.files
    extra = [f for f, _ in info.files[n:]]
    assert extra == sorted(extra) and all(f.startswith("torch/") for f in extra)
    assert "torch/nn/modules/linear.py" in extra and "torch/__init__.py" in extra
    assert all(_is_stdlib_module_source(PurePosixPath(f)) for f in extra)  # no test directories or test_*.py
    assert info.total_bytes > 3 * stdlib.total_bytes
    assert info.packages == (("torch", torch.__version__),) and stdlib.packages == ()
    assert f"torch {torch.__version__}" in info.short_str()
    full = load_corpus(None, "stdlib+torch")
    assert full.numel() == info.total_bytes
    assert torch.equal(full[: stdlib.total_bytes], load_corpus(None, "stdlib"))
    train, val = split_corpus(None, 0.1, "stdlib+torch")
    assert val.numel() == sum(int(k * 0.1) for _, k in info.files)
    assert train.numel() + val.numel() == info.total_bytes


def test_unknown_corpus_is_rejected():
    with pytest.raises(ValueError, match="corpus='wiki'"):
        load_corpus(1000, corpus="wiki")
    with pytest.raises(ValueError, match="corpus"):
        corpus_info(1000, "wiki")
    with pytest.raises(ValueError, match="corpus"):
        ByteCorpusDataModule(corpus="wiki")


def test_datamodule_on_the_stdlib_corpus():
    dm = ByteCorpusDataModule(
        block_size=16, batch_size=4, max_bytes=None, corpus="stdlib", samples_per_epoch=8, val_samples=6, seed=3
    )
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    train, val = split_corpus(None, 0.1, "stdlib")
    assert dm.train_set.data.numel() == train.numel() and dm.val_set.data.numel() == val.numel()
    demo = ByteCorpusDataModule(block_size=16, batch_size=4, max_bytes=None, samples_per_epoch=8, seed=3)
    assert not torch.equal(next(iter(demo.train_dataloader()))[0], x)


def test_split_is_per_file_disjoint_and_complete():
    train, val = split_corpus(100_000, val_fraction=0.25)
    assert train.numel() + val.numel() == 100_000
    assert 0.24 < val.numel() / 100_000 < 0.26
    # Each file's head goes to train and its tail to val: interleaving them back gives the corpus.
    corpus, pieces, tr, va = load_corpus(100_000), [], 0, 0
    for _, n in corpus_info(100_000).files:
        cut = n - int(n * 0.25)
        pieces += [train[tr : tr + cut], val[va : va + n - cut]]
        tr, va = tr + cut, va + n - cut
    assert torch.equal(torch.cat(pieces), corpus)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_bad_val_fraction_is_rejected(bad):
    with pytest.raises(ValueError, match="val_fraction"):
        split_corpus(10_000, val_fraction=bad)


def test_bad_max_bytes_is_rejected():
    with pytest.raises(ValueError, match="max_bytes"):
        load_corpus(1)


def test_random_windows_are_shifted_by_one_and_reproducible():
    data = load_corpus(20_000)
    ds = ByteWindowDataset(data, 32, num_samples=50, seed=7)
    assert len(ds) == 50
    for i in (0, 1, 49, 10_000):  # any index >= 0 is a valid window of the endless stream
        x, y = ds[i]
        start = ds.offset(i)
        assert x.dtype == torch.int64 and x.shape == (32,) and y.shape == (32,)
        assert torch.equal(x, data[start : start + 32].long())
        assert torch.equal(y, data[start + 1 : start + 33].long())
        assert torch.equal(x[1:], y[:-1])
    again = ByteWindowDataset(data, 32, num_samples=50, seed=7)
    other = ByteWindowDataset(data, 32, num_samples=50, seed=8)
    offsets = [ds.offset(i) for i in range(50)]
    assert offsets == [again.offset(i) for i in range(50)]
    assert offsets != [other.offset(i) for i in range(50)]
    assert len(set(offsets)) > 45  # spread out, not a few repeated windows
    assert max(offsets) <= data.numel() - 33  # the last window still has its target byte


def test_strided_windows_cover_the_split_without_overlap():
    data = torch.arange(101, dtype=torch.uint8)
    ds = ByteWindowDataset(data, 10, random=False)
    assert len(ds) == 10 and [ds.offset(i) for i in range(10)] == list(range(0, 100, 10))
    x, y = ds[9]
    assert torch.equal(y[-1], torch.tensor(100))
    sub = ByteWindowDataset(data, 10, num_samples=3, random=False)
    assert [sub.offset(i) for i in range(3)] == [0, 30, 60]
    with pytest.raises(IndexError):
        sub[3]


def test_dataset_rejects_bad_arguments():
    data = torch.zeros(100, dtype=torch.uint8)
    with pytest.raises(ValueError, match="block_size"):
        ByteWindowDataset(data, 0, num_samples=1)
    with pytest.raises(ValueError, match="fewer than block_size"):
        ByteWindowDataset(data, 100, num_samples=1)
    with pytest.raises(ValueError, match="num_samples"):
        ByteWindowDataset(data, 10)  # random windows need an epoch length


def test_epoch_sampler_gives_each_epoch_new_indices():
    s = EpochSampler(4)
    assert list(s) == [0, 1, 2, 3]
    s.set_epoch(2)
    assert list(s) == [8, 9, 10, 11] and len(s) == 4


def test_datamodule_batches():
    dm = ByteCorpusDataModule(
        block_size=16, batch_size=4, max_bytes=30_000, samples_per_epoch=10, val_samples=6, seed=3
    )
    train = list(dm.train_dataloader())
    assert len(train) == 2  # drop_last: every batch holds exactly B * T tokens
    x, y = train[0]
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert x.numel() == dm.tokens_per_batch == 64
    assert torch.equal(x[:, 1:], y[:, :-1])
    val = list(dm.val_dataloader())
    assert sum(b[0].shape[0] for b in val) == 6
    # Same seed, same batches; another seed, other batches.
    again = ByteCorpusDataModule(
        block_size=16, batch_size=4, max_bytes=30_000, samples_per_epoch=10, val_samples=6, seed=3
    )
    assert torch.equal(next(iter(again.train_dataloader()))[0], x)
    other = ByteCorpusDataModule(block_size=16, batch_size=4, max_bytes=30_000, samples_per_epoch=10, seed=4)
    assert not torch.equal(next(iter(other.train_dataloader()))[0], x)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block_size": 0}, "block_size"),
        ({"batch_size": -1}, "batch_size"),
        ({"samples_per_epoch": 0}, "samples_per_epoch"),
        ({"val_samples": 0}, "val_samples"),
        ({"num_workers": -1}, "num_workers"),
        ({"val_fraction": 1.0}, "val_fraction"),
    ],
)
def test_datamodule_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ByteCorpusDataModule(**kwargs)
