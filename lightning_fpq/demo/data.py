"""The demo's corpus: the Python standard library's own source, read as bytes.

Why this corpus: it is real text (code, comments, docstrings) that every machine running
this package already has, so the demo, the tests and the benchmarks need no download.
Byte-level tokens (vocab 256) mean no tokenizer either.

Determinism: the files are a fixed, ordered list of large, long-lived stdlib modules
(:data:`STDLIB_FILES`), read from ``sysconfig.get_paths()["stdlib"]``. The corpus is
therefore byte-identical on machines with the same Python version (stdlib sources can change
between patch releases, rarely and slightly). If a listed file is missing (a trimmed
install), the remaining top-level ``*.py`` files are taken in sorted order to make up the
requested size. :func:`corpus_info` records exactly which files and how many bytes.

Three corpora (``corpus=``): ``"demo"`` (the default; the fixed list above, what the demo, the
tests and the shipped calibration use); ``"stdlib"``: every non-test ``.py`` file of the
running Python's standard library (:func:`stdlib_files`: about 12 MB on CPython 3.11), in sorted
path order, for runs that must not see their data twice (``docs/dcrit_experiment.md``); and
``"stdlib+torch"``: that, then every non-test module of the installed ``torch`` package by the
same rule (58.5 MB in all with CPython 3.11.7 and torch 2.13.0), for longer runs. All split
every file the same way (:func:`split_corpus`): its last ``val_fraction`` is held out.

Batches are ``(x, y)``, both ``(B, T)`` int64 token ids, ``y`` being ``x`` shifted by one
byte. Tokens per batch = ``x.numel()`` = ``B * T``: the rule a token counter uses.
"""

from __future__ import annotations

import functools
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from .. import _config

VOCAB_SIZE = 256
# Large modules that exist as single files in CPython 3.8 to 3.14 (not packages, not
# removed by PEP 594), in a fixed order: the order is part of the corpus.
STDLIB_FILES: tuple[str, ...] = (
    "_pydecimal.py",
    "inspect.py",
    "typing.py",
    "pydoc.py",
    "tarfile.py",
    "doctest.py",
    "argparse.py",
    "_pyio.py",
    "pickletools.py",
    "subprocess.py",
    "difflib.py",
    "enum.py",
    "mailbox.py",
    "ipaddress.py",
    "pickle.py",
    "pdb.py",
    "ast.py",
    "optparse.py",
    "dataclasses.py",
    "threading.py",
    "shutil.py",
    "configparser.py",
    "statistics.py",
    "functools.py",
    "fractions.py",
    "random.py",
    "textwrap.py",
    "tempfile.py",
    "tokenize.py",
    "traceback.py",
    "calendar.py",
    "smtplib.py",
    "ftplib.py",
    "csv.py",
    "collections/__init__.py",
    "logging/__init__.py",
    "unittest/case.py",
    "http/client.py",
    "urllib/request.py",
    "email/message.py",
)
# The listed files hold about 3 MB; the default takes 2 MB of them: enough text that the demo
# models (a few hundred steps of 16 x 128 tokens) do not see a byte twice.
DEFAULT_MAX_BYTES = 2_000_000
# The corpora :func:`load_corpus` knows: the fixed list above, every non-test stdlib module, and
# those followed by every non-test module of the installed torch package.
CORPORA: tuple[str, ...] = ("demo", "stdlib", "stdlib+torch")
# A directory of the stdlib with one of these names holds tests (test/, lib2to3/tests/,
# idlelib/idle_test/, ...); so does a file named test_*.py.
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})


@dataclass(frozen=True)
class CorpusInfo:
    """Where the corpus came from: ``files`` is ``((path, bytes taken), ...)``, a path relative to
    the stdlib directory ``root``, or for a package's file (``packages``: ``(name, version)``)
    relative to the directory that holds the package (``torch/nn/...``)."""

    root: str
    python_version: str
    files: tuple[tuple[str, int], ...]
    packages: tuple[tuple[str, str], ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(n for _, n in self.files)

    def short_str(self) -> str:
        extra = "".join(f" + {name} {version}" for name, version in self.packages)
        return f"Python {self.python_version} stdlib{extra}: {len(self.files)} files, {self.total_bytes:,} bytes"


def _check_max_bytes(max_bytes: int | None) -> None:
    """None (all listed files) or an int >= 2."""
    _config.integer(max_bytes, what="max_bytes", low=2, optional=True)


def _check_corpus(corpus: str) -> None:
    if corpus not in CORPORA:
        raise ValueError(f"corpus={corpus!r} is not valid: expected one of {', '.join(map(repr, CORPORA))}")


def _is_stdlib_module_source(rel: Path) -> bool:
    """``rel`` (relative to the stdlib directory) is an importable, non-test module's source: every
    directory on its path is a package name (not site-packages, not config-3.x-...), none is a
    test directory, and the file is not a ``test_*.py``."""
    dirs = rel.parts[:-1]
    if any(not d.isidentifier() or d in _TEST_DIRS for d in dirs):
        return False
    return rel.suffix == ".py" and not rel.name.startswith("test_")


@functools.lru_cache(maxsize=4)
def _module_sources(root: str, package: str = "") -> tuple[str, ...]:
    """The non-test module sources under ``root`` (or under its ``package`` directory), as sorted
    ``/``-separated paths relative to ``root``."""
    base = Path(root)
    rels = (p.relative_to(base) for p in (base / package).rglob("*.py") if p.is_file())
    return tuple(sorted(r.as_posix() for r in rels if _is_stdlib_module_source(r)))


def stdlib_files() -> tuple[str, ...]:
    """Every non-test ``.py`` file of the running Python's standard library, as paths relative to
    ``sysconfig.get_paths()["stdlib"]`` (``/`` separated), sorted: the ``"stdlib"`` corpus's files,
    in its order. Left out: test directories (``test``, ``tests``, ``idle_test``) and
    ``test_*.py`` files, and directories that are not packages (``site-packages``, ``config-*``)."""
    return _module_sources(sysconfig.get_paths()["stdlib"])


def _check_val_fraction(val_fraction: float) -> None:
    _config.number(val_fraction, what="val_fraction", low=0.0, high=1.0, low_open=True, high_open=True)


@functools.lru_cache(maxsize=8)
def _read_corpus(max_bytes: int | None, corpus: str = "demo") -> tuple[bytes, CorpusInfo]:
    root = Path(sysconfig.get_paths()["stdlib"])
    packages: tuple[tuple[str, str], ...] = ()
    if corpus.startswith("stdlib"):
        listed, extra = [(root, rel) for rel in stdlib_files()], []
        if corpus == "stdlib+torch":
            site = Path(torch.__file__).resolve().parent.parent
            listed += [(site, rel) for rel in _module_sources(str(site), "torch")]
            packages = (("torch", torch.__version__),)
    else:
        listed = [(root, p) for p in STDLIB_FILES if (root / p).is_file()]
        # Fallback for trimmed installs: more files in sorted order, only as far as needed.
        extra = [(root, p.name) for p in sorted(root.glob("*.py")) if p.name not in STDLIB_FILES]
    chunks: list[bytes] = []
    files: list[tuple[str, int]] = []
    total = 0
    for i, (base, rel) in enumerate(listed + extra):
        if max_bytes is None and i >= len(listed):
            break  # "everything" means the fixed list, never the machine-dependent fallback
        if max_bytes is not None and total >= max_bytes:
            break
        data = (base / rel).read_bytes()
        if max_bytes is not None:
            data = data[: max_bytes - total]
        if data:
            chunks.append(data)
            files.append((rel, len(data)))
            total += len(data)
    if not files:
        raise FileNotFoundError(
            f"none of the corpus's source files are under the stdlib directory {str(root)!r}; "
            "this Python install ships without .py sources, so the demo corpus is unavailable"
        )
    version = ".".join(map(str, sys.version_info[:3]))
    return b"".join(chunks), CorpusInfo(str(root), version, tuple(files), packages)


def corpus_info(max_bytes: int | None = DEFAULT_MAX_BYTES, corpus: str = "demo") -> CorpusInfo:
    """Which files (and how many bytes of each) make up :func:`load_corpus` ``(max_bytes, corpus)``."""
    _check_max_bytes(max_bytes)
    _check_corpus(corpus)
    return _read_corpus(max_bytes, corpus)[1]


def load_corpus(max_bytes: int | None = DEFAULT_MAX_BYTES, corpus: str = "demo") -> torch.Tensor:
    """The corpus as a 1-D uint8 tensor of at most ``max_bytes`` bytes (``None``: all of it).

    ``corpus``: ``"demo"``, the fixed list :data:`STDLIB_FILES` (``None``: every listed file,
    about 3 MB), ``"stdlib"``, every file of :func:`stdlib_files` (``None``: all, about 12 MB), or
    ``"stdlib+torch"``, those and then the installed torch package's modules (58.5 MB here).
    The bytes are read once per ``(max_bytes, corpus)`` and cached; each call returns a fresh
    tensor, so callers may modify it.
    """
    _check_max_bytes(max_bytes)
    _check_corpus(corpus)
    data, _ = _read_corpus(max_bytes, corpus)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)  # (N,)


def split_corpus(
    max_bytes: int | None = DEFAULT_MAX_BYTES, val_fraction: float = 0.1, corpus: str = "demo"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, val)`` uint8 tensors: the last ``val_fraction`` of every file goes to validation.

    Splitting each file (rather than taking the corpus's last files) keeps the two splits
    alike in content: every module contributes to both, and no byte is in both.
    """
    _check_val_fraction(val_fraction)
    data = load_corpus(max_bytes, corpus)
    train, val = [], []
    start = 0
    for _, n in corpus_info(max_bytes, corpus).files:
        cut = start + n - int(n * val_fraction)
        train.append(data[start:cut])
        val.append(data[cut : start + n])
        start += n
    return torch.cat(train), torch.cat(val)


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a fixed, well-mixed 64-bit hash (same on every platform)."""
    x &= 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


class ByteWindowDataset(Dataset):
    """Windows of ``block_size + 1`` bytes of ``data``, returned as ``(x, y)`` int64 of shape ``(T,)``.

    ``random=True``: item ``i`` starts at a pseudo-random offset that depends only on
    ``(seed, i)``. Any ``i >= 0`` is valid, so the indices form one endless, reproducible
    stream of windows; ``len()`` is ``num_samples`` (one epoch) and :class:`EpochSampler`
    gives epoch ``e`` the indices ``e * num_samples ...``, so epochs differ.

    ``random=False``: non-overlapping windows at offsets ``0, T, 2T, ...`` (for validation);
    with ``num_samples`` smaller than their number, an evenly spaced subset of them.
    """

    def __init__(
        self,
        data: torch.Tensor,
        block_size: int,
        *,
        num_samples: int | None = None,
        seed: int = 0,
        random: bool = True,
    ) -> None:
        if data.dim() != 1:
            raise ValueError(f"data must be a 1-D tensor of token ids, got shape {tuple(data.shape)}")
        _config.integer(block_size, what="block_size", low=1)
        if data.numel() < block_size + 1:
            raise ValueError(
                f"data has {data.numel()} tokens, fewer than block_size + 1 = {block_size + 1}; "
                "use a smaller block_size or more data (max_bytes)"
            )
        _config.integer(num_samples, what="num_samples", low=1, optional=True)
        if random and num_samples is None:
            raise ValueError("random windows need num_samples (the number of samples per epoch)")
        self.data = data
        self.block_size = block_size
        self.seed = seed
        self.random = random
        # Random windows may start anywhere a full window of T + 1 bytes fits.
        self._num_starts = data.numel() - block_size
        self._num_strided = (data.numel() - 1) // block_size
        if random:
            self.num_samples = num_samples
        else:
            self.num_samples = min(num_samples or self._num_strided, self._num_strided)

    def __len__(self) -> int:
        return self.num_samples

    def offset(self, index: int) -> int:
        """Where window ``index`` starts in ``data``."""
        if index < 0:
            raise IndexError(f"window index must be >= 0, got {index}")
        if self.random:
            return _mix64(_mix64(self.seed) + index) % self._num_starts
        if index >= self.num_samples:
            raise IndexError(f"window index {index} out of range for {self.num_samples} windows")
        return (index * self._num_strided // self.num_samples) * self.block_size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.offset(index)
        chunk = self.data[start : start + self.block_size + 1].long()  # (T + 1,)
        return chunk[:-1], chunk[1:]  # (T,), (T,)


class EpochSampler(Sampler[int]):
    """Yields ``epoch * n, ..., epoch * n + n - 1``: fresh windows of a random :class:`ByteWindowDataset`
    each epoch. Lightning calls :meth:`set_epoch` (also through its distributed wrapper, which
    then gives each rank a disjoint share of these indices)."""

    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.epoch * self.num_samples, (self.epoch + 1) * self.num_samples))

    def __len__(self) -> int:
        return self.num_samples


class ByteCorpusDataModule(LightningDataModule):
    """Byte-level language modelling on :func:`split_corpus`; batches ``(x, y)`` of shape ``(B, T)``.

    Args:
        block_size: ``T``, tokens per sample.
        batch_size: ``B``, samples per batch (per device).
        max_bytes: corpus size in bytes (``None``: all of the corpus).
        val_fraction: share of each file held out for validation.
        seed: picks the random training windows; the same seed gives the same batches.
        samples_per_epoch: random training windows per epoch. To train on ``D`` tokens
            in one epoch, pass ``D // block_size``.
        val_samples: validation windows (evenly spaced, non-overlapping); ``None``: all.
        num_workers: DataLoader worker processes (0 is fastest for this in-memory data).
        corpus: ``"demo"`` (the fixed list of modules, about 3 MB), ``"stdlib"`` (every
            non-test module of the standard library, about 12 MB; pass ``max_bytes=None``) or
            ``"stdlib+torch"`` (those, then the installed torch package's modules: 58.5 MB
            with CPython 3.11.7 and torch 2.13.0).
    """

    def __init__(
        self,
        block_size: int = 128,
        batch_size: int = 16,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        val_fraction: float = 0.1,
        seed: int = 0,
        samples_per_epoch: int = 16_000,
        val_samples: int | None = 256,
        num_workers: int = 0,
        corpus: str = "demo",
    ) -> None:
        super().__init__()
        for name, value in (
            ("block_size", block_size),
            ("batch_size", batch_size),
            ("samples_per_epoch", samples_per_epoch),
        ):
            _config.integer(value, what=name, low=1)
        _config.integer(val_samples, what="val_samples", low=1, optional=True)  # None: all windows
        _config.integer(num_workers, what="num_workers", low=0)
        _check_max_bytes(max_bytes)
        _check_val_fraction(val_fraction)
        _check_corpus(corpus)
        self.save_hyperparameters()
        self.block_size = block_size
        self.batch_size = batch_size
        self.max_bytes = max_bytes
        self.val_fraction = val_fraction
        self.seed = seed
        self.samples_per_epoch = samples_per_epoch
        self.val_samples = val_samples
        self.num_workers = num_workers
        self.corpus = corpus
        self.train_set: ByteWindowDataset | None = None
        self.val_set: ByteWindowDataset | None = None

    @property
    def tokens_per_batch(self) -> int:
        """``B * T`` on one device."""
        return self.batch_size * self.block_size

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, val = split_corpus(self.max_bytes, self.val_fraction, self.corpus)
        self.train_set = ByteWindowDataset(train, self.block_size, num_samples=self.samples_per_epoch, seed=self.seed)
        self.val_set = ByteWindowDataset(val, self.block_size, num_samples=self.val_samples, random=False)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=EpochSampler(len(self.train_set)),
            num_workers=self.num_workers,
            drop_last=True,  # every batch has exactly B * T tokens
        )

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
