"""Webdataset shards of training samples: writing, reading, and a DataLoader-ready dataset.

A sample is a dict with a ``key`` (str), a ``caption`` (str), ``labels`` (a JSON dict), any number
of named tensors (``latents``, ``text_emb``, ``text_mask``, ``noise``, ``trajectory``, ...) and
optionally more JSON-serialisable metadata. In a shard, each sample is three tar members:

- ``<key>.tensors.safetensors``: all tensors in one safetensors blob (records dtype and shape,
  supports bf16, and cannot carry code, unlike a pickle),
- ``<key>.caption.txt``: the caption, UTF-8,
- ``<key>.meta.json``: ``labels`` and any other non-tensor fields.

``ShardWriter`` writes the tars with ``webdataset.TarWriter`` plus an ``index.json`` (shard names,
sample counts, tensor schema). Reading uses plain ``tarfile`` in stream mode instead of a
webdataset pipeline, so that every failure (unreadable tar, truncated tar, corrupt member, sample
count that disagrees with the index) is caught at one place, named, counted and skipped or raised.
"""

from __future__ import annotations

import json
import os
import random
import tarfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import webdataset as wds
from braceexpand import braceexpand
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch.utils.data import IterableDataset, get_worker_info

__all__ = [
    "ReadStats",
    "ShardDataset",
    "ShardError",
    "ShardWriter",
    "collate",
    "read_shards",
]

TENSORS, CAPTION, META = "tensors.safetensors", "caption.txt", "meta.json"
INDEX = "index.json"

Source = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
Expect = Mapping[str, tuple[Sequence[int | None], torch.dtype | str]]
OnError = Literal["warn", "raise"]
Sample = dict[str, Any]


class ShardError(RuntimeError):
    """A shard or a sample in it cannot be read (corrupt, truncated, or disagrees with its index)."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)


@dataclass
class ReadStats:
    """Counts of what a reader yielded and skipped, so a caller can report data loss.

    ``skipped_samples`` counts corrupt samples plus, for a broken shard listed in an
    ``index.json``, the samples it should have had but did not yield; for a broken shard
    without an index entry the number lost is unknown and not counted.
    """

    samples_read: int = 0
    shards_read: int = 0
    skipped_samples: int = 0
    skipped_shards: list[str] = field(default_factory=list)


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def _schema_of(sample: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The tensors' {name: {"dtype", "shape"}}, as recorded in ``index.json``."""
    return {
        k: {"dtype": _dtype_name(v.dtype), "shape": list(v.shape)}
        for k, v in sample.items()
        if isinstance(v, torch.Tensor)
    }


class ShardWriter:
    """Writes samples into ``<prefix>-000000.tar``, ... and ``index.json`` under ``out_dir``.

    Each tar is written under a ``.tmp`` name and renamed when full, so a reader never sees a
    half-written shard. Every sample must match the tensor schema (names, dtypes, shapes) of
    the first one. ``index.json`` is written on a clean close only: if the ``with`` block
    raises, the open shard is deleted and no index is written, which marks the run unfinished.
    """

    def __init__(
        self, out_dir: str | os.PathLike[str], prefix: str = "shard", max_samples_per_shard: int = 1000
    ) -> None:
        if max_samples_per_shard < 1:
            raise ValueError(f"max_samples_per_shard must be >= 1, got {max_samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_samples_per_shard = max_samples_per_shard
        self.schema: dict[str, dict[str, Any]] | None = None
        self.shards: list[dict[str, Any]] = []
        self._tar: wds.TarWriter | None = None
        self._count = 0
        self._keys: set[str] = set()
        self._closed = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def write(self, sample: Mapping[str, Any]) -> None:
        """Validates ``sample`` against the schema and appends it to the current shard."""
        if self._closed:
            raise ValueError(f"ShardWriter for {self.out_dir} is closed")
        members = self._encode(sample)
        if self._tar is None:
            self._tar = wds.TarWriter(str(self._tmp_path()), encoder=False, mtime=0)
        self._tar.write(members)
        self._count += 1
        if self._count == self.max_samples_per_shard:
            self._finish_shard()

    def close(self) -> None:
        """Finishes the open shard and writes ``index.json`` (atomically, like the shards)."""
        if self._closed:
            return
        if self._tar is not None:
            self._finish_shard()
        index = {
            "version": 1,
            "num_samples": sum(s["samples"] for s in self.shards),
            "shards": self.shards,
            "schema": self.schema or {},
        }
        tmp = self.out_dir / f"{INDEX}.tmp"
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, self.out_dir / INDEX)
        self._closed = True

    def _shard_name(self) -> str:
        return f"{self.prefix}-{len(self.shards):06d}.tar"

    def _tmp_path(self) -> Path:
        return self.out_dir / f"{self._shard_name()}.tmp"

    def _finish_shard(self) -> None:
        assert self._tar is not None
        self._tar.close()
        os.replace(self._tmp_path(), self.out_dir / self._shard_name())
        self.shards.append({"name": self._shard_name(), "samples": self._count})
        self._tar, self._count = None, 0

    def _abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tmp_path().unlink(missing_ok=True)
            self._tar = None
        self._closed = True

    def _encode(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        key = sample.get("key")
        if not isinstance(key, str) or not key or "." in key:
            raise ValueError(f"sample key must be a non-empty str without '.', got {key!r}")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        if not isinstance(sample.get("caption"), str):
            raise ValueError(f"sample {key!r}: 'caption' must be a str")
        if not isinstance(sample.get("labels"), dict):
            raise ValueError(f"sample {key!r}: 'labels' must be a dict")
        tensors = {k: v for k, v in sample.items() if isinstance(v, torch.Tensor)}
        schema = _schema_of(tensors)
        if self.schema is None:
            self.schema = schema
        elif schema != self.schema:
            raise ValueError(f"sample {key!r}: {_schema_diff(self.schema, schema)}")
        meta = {k: v for k, v in sample.items() if k not in ("key", "caption") and k not in tensors}
        try:
            meta_json = json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise ValueError(f"sample {key!r}: metadata is not JSON-serialisable: {e}") from e
        self._keys.add(key)
        # Clone: safetensors refuses tensors that share storage (e.g. noise = trajectory[0]).
        blob = save_tensors(
            {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
        )
        return {"__key__": key, TENSORS: blob, CAPTION: sample["caption"].encode(), META: meta_json.encode()}


def _schema_diff(expected: Mapping[str, Mapping[str, Any]], got: Mapping[str, Mapping[str, Any]]) -> str:
    """Describes the first difference between two schemas ({name: {dtype, shape}})."""
    if set(expected) != set(got):
        return f"tensor names differ: expected {sorted(expected)}, got {sorted(got)}"
    name = next(k for k in expected if expected[k] != got[k])
    e, g = expected[name], got[name]
    return (
        f"tensor {name!r}: expected shape {list(e['shape'])} dtype {e['dtype']}, "
        f"got shape {list(g['shape'])} dtype {g['dtype']}"
    )


@dataclass(frozen=True)
class _Shard:
    path: Path
    samples: int | None  # from index.json, to detect truncation at a member boundary
    schema: dict[str, dict[str, Any]] | None


def _load_index(directory: Path) -> dict[str, Any] | None:
    path = directory / INDEX
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def _resolve(source: Source) -> list[_Shard]:
    """Turns a directory, a .tar path, a brace pattern or a list of paths into shards.

    Shards in a directory with an ``index.json`` get its sample count and schema, so that
    reading can check them.
    """
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if "{" in text:
            paths = [Path(p) for p in braceexpand(text)]
        elif Path(text).is_dir():
            index = _load_index(Path(text))
            if index is not None:
                paths = [Path(text) / s["name"] for s in index["shards"]]
            else:
                paths = sorted(Path(text).glob("*.tar"))
            if not paths:
                raise FileNotFoundError(f"no shards (index.json or *.tar) in {text}")
        else:
            paths = [Path(text)]
    else:
        paths = [Path(p) for p in source]
    if not paths:
        raise FileNotFoundError("no shard paths given")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"no such shard file or directory: {path}")
    indexes: dict[Path, dict[str, Any] | None] = {}
    shards = []
    for path in paths:
        if path.parent not in indexes:
            indexes[path.parent] = _load_index(path.parent)
        index = indexes[path.parent] or {"shards": []}
        counts = {s["name"]: s["samples"] for s in index["shards"]}
        listed = path.name in counts
        shards.append(_Shard(path, counts.get(path.name), index.get("schema") if listed else None))
    return shards


def _groups(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yields (key, {extension: bytes}) for runs of consecutive members with the same key."""
    key, members = None, {}
    for info in tar:
        if not info.isfile():
            continue
        member_key, _, ext = info.name.partition(".")
        if member_key != key:
            if key is not None:
                yield key, members
            key, members = member_key, {}
        members[ext] = tar.extractfile(info).read()
    if key is not None:
        yield key, members


def _decode(key: str, members: Mapping[str, bytes]) -> Sample:
    missing = [m for m in (TENSORS, CAPTION, META) if m not in members]
    if missing:
        raise ValueError(f"missing members {missing}")
    meta = json.loads(members[META])
    if not isinstance(meta, dict):
        raise ValueError(f"{META} is not a JSON object")
    return {"key": key, **load_tensors(members[TENSORS]), "caption": members[CAPTION].decode(), **meta}


def _check(sample: Mapping[str, Any], shard: _Shard, expect: Expect | None) -> None:
    """Raises ValueError if the sample's tensors disagree with the index schema or ``expect``."""
    got = _schema_of(sample)
    where = f"{shard.path}: sample {sample['key']!r}"
    if shard.schema is not None and got != shard.schema:
        raise ValueError(f"{where}: disagrees with {INDEX}: {_schema_diff(shard.schema, got)}")
    for name, (shape, dtype) in (expect or {}).items():
        if name not in got:
            raise ValueError(f"{where}: expected tensor {name!r} is missing (has {sorted(got)})")
        g = got[name]
        shape_ok = len(shape) == len(g["shape"]) and all(e in (None, n) for e, n in zip(shape, g["shape"]))
        if not shape_ok or _dtype_name(dtype) != g["dtype"]:
            raise ValueError(
                f"{where}: tensor {name!r}: expected shape {list(shape)} dtype {_dtype_name(dtype)}, "
                f"got shape {g['shape']} dtype {g['dtype']}"
            )


def _skip(error: ShardError, on_error: OnError) -> None:
    if on_error == "raise":
        raise error
    warnings.warn(f"skipping unreadable data: {error}")


def _read_shard(
    shard: _Shard, on_error: OnError, expect: Expect | None, stats: ReadStats
) -> Iterator[Sample]:
    """Streams one shard's samples; a broken shard stops after its last intact sample."""
    seen = 0
    try:
        with tarfile.open(shard.path, "r|") as tar:
            for key, members in _groups(tar):
                seen += 1
                try:
                    sample = _decode(key, members)
                except (SafetensorError, ValueError) as e:
                    stats.skipped_samples += 1
                    _skip(ShardError(shard.path, f"corrupt sample {key!r}: {e}"), on_error)
                    continue
                _check(sample, shard, expect)
                stats.samples_read += 1
                yield sample
        if shard.samples is not None and seen != shard.samples:
            raise tarfile.ReadError(f"{INDEX} lists {shard.samples} samples, found {seen}")
    except (tarfile.TarError, OSError) as e:
        stats.skipped_samples += max(0, (shard.samples or 0) - seen)
        stats.skipped_shards.append(str(shard.path))
        _skip(ShardError(shard.path, f"unreadable shard after {seen} samples: {e}"), on_error)
        return
    stats.shards_read += 1


def _read_all(
    shards: Iterable[_Shard], on_error: OnError, expect: Expect | None, stats: ReadStats
) -> Iterator[Sample]:
    for shard in shards:
        yield from _read_shard(shard, on_error, expect, stats)


def _shuffle(samples: Iterable[Sample], size: int, rng: random.Random) -> Iterator[Sample]:
    """Buffer shuffle: holds ``size`` samples and yields a random one as each new one arrives."""
    buffer: list[Sample] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= size:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def _check_on_error(on_error: str) -> None:
    if on_error not in ("warn", "raise"):
        raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")


def read_shards(
    source: Source,
    *,
    on_error: OnError = "warn",
    shuffle_buffer: int = 0,
    seed: int = 0,
    expect: Expect | None = None,
    stats: ReadStats | None = None,
) -> Iterator[Sample]:
    """Yields the samples of ``source`` as written (tensors keep their dtype).

    ``source``: a directory (its ``index.json``, else its ``*.tar``), a ``.tar`` path, a brace
    pattern (``dir/shard-{000000..000009}.tar``) or a list of paths. Missing paths raise
    FileNotFoundError now, not at the first ``next``. With ``shuffle_buffer > 0`` the shard order
    and the samples (through a buffer of that size) are shuffled, deterministically for ``seed``.
    Unreadable shards and corrupt samples are warned about and skipped (``on_error="warn"``) or
    raise ShardError (``"raise"``); they are counted in ``stats`` if given. Tensors that disagree
    with ``index.json`` or ``expect`` ({name: (shape, dtype)}, ``None`` in a shape matches any
    size) raise ValueError either way: that is a wrong dataset, not a damaged one.
    """
    _check_on_error(on_error)
    shards = _resolve(source)
    rng = random.Random(seed)
    if shuffle_buffer > 0:
        rng.shuffle(shards)
    samples = _read_all(shards, on_error, expect, stats if stats is not None else ReadStats())
    return _shuffle(samples, shuffle_buffer, rng) if shuffle_buffer > 0 else samples


class ShardDataset(IterableDataset):
    """Shards as a DataLoader dataset: each shard goes to exactly one (rank, worker) per epoch.

    Shards, not samples, are split across ``torch.distributed`` ranks and DataLoader workers,
    so there must be at least ranks x workers shards (ideally many more, of equal size: ranks
    with fewer samples finish an epoch early, so for multi-rank training use ``repeat=True``
    and a fixed number of steps). With ``shuffle_buffer > 0`` the shard order is reshuffled each
    epoch from ``(seed, epoch)``, identically on every rank so the split stays a partition, and
    samples are buffer-shuffled per worker. ``stats`` counts only what this process read (a
    worker's counts stay in the worker; its warnings still show).
    """

    def __init__(
        self,
        source: Source,
        *,
        shuffle_buffer: int = 0,
        seed: int = 0,
        repeat: bool = False,
        on_error: OnError = "warn",
        expect: Expect | None = None,
    ) -> None:
        _check_on_error(on_error)
        self.shards = _resolve(source)
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.repeat = repeat
        self.on_error: OnError = on_error
        self.expect = expect
        self.epoch = 0
        self.stats = ReadStats()

    def set_epoch(self, epoch: int) -> None:
        """Selects the shuffle of the next ``iter`` (for ``repeat=False``, call once per epoch)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[Sample]:
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        consumer, consumers = rank * workers + worker, world * workers
        if len(self.shards) < consumers:
            raise ValueError(
                f"{len(self.shards)} shards cannot be split over {world} ranks x {workers} workers; "
                "write more shards or use fewer workers"
            )
        epoch = self.epoch
        while True:
            order = list(self.shards)
            if self.shuffle_buffer > 0:
                random.Random(f"{self.seed}-{epoch}").shuffle(order)
            samples = _read_all(order[consumer::consumers], self.on_error, self.expect, self.stats)
            if self.shuffle_buffer > 0:
                rng = random.Random(f"{self.seed}-{epoch}-{consumer}")
                samples = _shuffle(samples, self.shuffle_buffer, rng)
            yielded = 0
            for sample in samples:
                yielded += 1
                yield sample
            if not self.repeat:
                return
            if yielded == 0:  # would otherwise loop forever without yielding
                raise ShardError(order[consumer].path.parent, "no readable samples in this worker's shards")
            epoch += 1


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batches samples: tensors are stacked on a new dim 0, everything else becomes a list."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    fields = list(samples[0])
    for sample in samples[1:]:
        if set(sample) != set(fields):
            raise ValueError(
                f"sample {sample.get('key')!r} has fields {sorted(sample)}, expected {sorted(fields)}"
            )
    batch: dict[str, Any] = {}
    for name in fields:
        values = [s[name] for s in samples]
        if isinstance(values[0], torch.Tensor):
            try:
                batch[name] = torch.stack(values)
            except RuntimeError as e:
                raise ValueError(f"cannot stack tensor {name!r}: {e}") from e
        else:
            batch[name] = values
    return batch
