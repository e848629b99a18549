"""Shard writing and reading: round trip, index, schema checks, damaged shards, DataLoader split."""

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from distill.data.shards import ReadStats, ShardDataset, ShardError, ShardWriter, collate, read_shards

N, PER_SHARD = 10, 4  # -> shards of 4, 4, 2 samples


def make_sample(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    return {
        "key": f"s{i:04d}",
        "latents": torch.randn(4, 2, 3, 3, generator=g).to(torch.bfloat16),
        "text_emb": torch.randn(5, 8, generator=g),
        "text_mask": torch.arange(5) < (i % 5 + 1),
        "noise": torch.randint(-100, 100, (3,), generator=g, dtype=torch.int64),
        "caption": f"a red square moving left #{i} ✓",
        "labels": {"shape": "square", "speed": i % 3} if i % 2 else {},
    }


def write_dataset(out: Path, n: int = N, per_shard: int = PER_SHARD) -> list[dict]:
    samples = [make_sample(i) for i in range(n)]
    with ShardWriter(out, max_samples_per_shard=per_shard) as writer:
        for s in samples:
            writer.write(s)
    return samples


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert b[k].dtype == v.dtype and b[k].shape == v.shape, k
            assert torch.equal(b[k].flatten().view(torch.uint8), v.flatten().view(torch.uint8)), k  # bitwise
        else:
            assert b[k] == v, k


def test_round_trip_preserves_tensors_and_order(tmp_path):
    samples = write_dataset(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["index.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    stats = ReadStats()
    got = list(read_shards(tmp_path, stats=stats))
    assert [s["key"] for s in got] == [s["key"] for s in samples]
    for a, b in zip(samples, got):
        assert_same(a, b)
    assert stats == ReadStats(samples_read=N, shards_read=3)
    # a single tar, a brace pattern and a list of paths are sources too
    assert [s["key"] for s in read_shards(tmp_path / "shard-000001.tar")] == [f"s000{i}" for i in range(4, 8)]
    assert len(list(read_shards(str(tmp_path / "shard-{000000..000001}.tar")))) == 8
    assert len(list(read_shards([tmp_path / "shard-000002.tar", tmp_path / "shard-000000.tar"]))) == 6


def test_index_json(tmp_path):
    write_dataset(tmp_path)
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["num_samples"] == N
    assert index["shards"] == [
        {"name": "shard-000000.tar", "samples": 4},
        {"name": "shard-000001.tar", "samples": 4},
        {"name": "shard-000002.tar", "samples": 2},
    ]
    assert index["schema"] == {
        "latents": {"dtype": "bfloat16", "shape": [4, 2, 3, 3]},
        "text_emb": {"dtype": "float32", "shape": [5, 8]},
        "text_mask": {"dtype": "bool", "shape": [5]},
        "noise": {"dtype": "int64", "shape": [3]},
    }


def test_writer_rejects_schema_mismatch(tmp_path):
    with ShardWriter(tmp_path) as writer:
        writer.write(make_sample(0))
        bad = make_sample(1) | {"latents": torch.zeros(4, 2, 3, 4, dtype=torch.bfloat16)}
        with pytest.raises(ValueError, match=r"s0001.*'latents'.*\[4, 2, 3, 3\].*\[4, 2, 3, 4\]"):
            writer.write(bad)
        with pytest.raises(ValueError, match=r"'text_emb'.*float32.*float16"):
            writer.write(make_sample(2) | {"text_emb": torch.zeros(5, 8, dtype=torch.float16)})
        with pytest.raises(ValueError, match="tensor names differ"):
            writer.write({k: v for k, v in make_sample(3).items() if k != "noise"})
        with pytest.raises(ValueError, match="duplicate"):
            writer.write(make_sample(0))


def test_failed_write_leaves_no_partial_shard_or_index(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path) as writer:
            writer.write(make_sample(0))
            raise RuntimeError("precompute crashed")
    assert list(tmp_path.iterdir()) == []


def test_expect_mismatch_on_read_raises(tmp_path):
    write_dataset(tmp_path)
    ok = {"latents": ((4, None, 3, 3), torch.bfloat16), "text_mask": ((5,), "bool")}
    assert len(list(read_shards(tmp_path, expect=ok))) == N
    with pytest.raises(ValueError, match=r"shard-000000\.tar.*s0000.*'latents'.*\[4, 2, 3, 3\].*float32"):
        next(read_shards(tmp_path, expect={"latents": ((4, 2, 3, 3), torch.float32)}))
    with pytest.raises(ValueError, match=r"'text_emb'.*\[5, 9\]"):
        next(read_shards(tmp_path, expect={"text_emb": ((5, 9), torch.float32)}))
    with pytest.raises(ValueError, match="'trajectory' is missing"):
        next(read_shards(tmp_path, expect={"trajectory": ((2,), torch.float32)}))


def damage(tmp_path: Path) -> None:
    """Cuts shard 1 in half and replaces shard 2 with garbage."""
    shard1 = tmp_path / "shard-000001.tar"
    data = shard1.read_bytes()
    shard1.write_bytes(data[: len(data) // 2])
    (tmp_path / "shard-000002.tar").write_bytes(b"not a tar file " * 100)


def test_damaged_shards_warn_count_and_skip(tmp_path):
    samples = write_dataset(tmp_path)
    damage(tmp_path)
    stats = ReadStats()
    with pytest.warns(UserWarning) as record:
        got = list(read_shards(tmp_path, stats=stats))
    messages = " ".join(str(w.message) for w in record)
    assert "shard-000001.tar" in messages and "shard-000002.tar" in messages
    keys = [s["key"] for s in got]
    assert keys[:4] == ["s0000", "s0001", "s0002", "s0003"]  # the intact shard comes through
    assert set(keys) <= {s["key"] for s in samples[:8]}  # plus whatever precedes the cut in shard 1
    assert stats.skipped_shards == [str(tmp_path / "shard-000001.tar"), str(tmp_path / "shard-000002.tar")]
    assert stats.shards_read == 1
    assert stats.samples_read == len(got)
    assert stats.samples_read + stats.skipped_samples == N  # the index says how many were lost


def test_damaged_shards_raise(tmp_path):
    write_dataset(tmp_path)
    damage(tmp_path)
    with pytest.raises(ShardError, match="shard-000001.tar") as err:
        list(read_shards(tmp_path, on_error="raise"))
    assert err.value.path == str(tmp_path / "shard-000001.tar")
    with pytest.raises(ShardError, match="shard-000002.tar"):
        list(read_shards(tmp_path / "shard-000002.tar", on_error="raise"))


def test_corrupt_member_skips_only_that_sample(tmp_path):
    write_dataset(tmp_path, n=3, per_shard=3)
    shard = tmp_path / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    # break the safetensors header of the second sample (its length prefix), tar structure intact
    blob = data.index(b"s0001.tensors.safetensors") + 512  # member data follows its 512-byte tar header
    data[blob : blob + 8] = b"\xff" * 8
    shard.write_bytes(bytes(data))
    stats = ReadStats()
    with pytest.warns(UserWarning, match=r"shard-000000.tar.*s0001"):
        keys = [s["key"] for s in read_shards(tmp_path, stats=stats)]
    assert keys == ["s0000", "s0002"]
    assert (stats.skipped_samples, stats.skipped_shards, stats.shards_read) == (1, [], 1)


def test_missing_sources_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        read_shards(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        read_shards(tmp_path)  # exists but holds no shards
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        ShardDataset([tmp_path / "missing.tar"])


def test_directory_without_index_is_globbed(tmp_path):
    write_dataset(tmp_path)
    (tmp_path / "index.json").unlink()
    assert len(list(read_shards(tmp_path))) == N


def test_dataloader_workers_see_each_sample_once(tmp_path):
    samples = write_dataset(tmp_path)
    loader = DataLoader(ShardDataset(tmp_path), batch_size=3, num_workers=2, collate_fn=collate)
    keys = []
    for batch in loader:
        assert batch["latents"].shape[1:] == (4, 2, 3, 3) and batch["latents"].dtype == torch.bfloat16
        assert batch["text_mask"].dtype == torch.bool
        assert len(batch["caption"]) == len(batch["labels"]) == len(batch["key"]) == batch["latents"].shape[0]
        keys += batch["key"]
    assert sorted(keys) == [s["key"] for s in samples]


def test_shuffle_is_deterministic(tmp_path):
    write_dataset(tmp_path)
    keys = lambda **kw: [s["key"] for s in read_shards(tmp_path, shuffle_buffer=4, **kw)]  # noqa: E731
    assert keys(seed=1) == keys(seed=1)
    assert keys(seed=1) != keys(seed=2)
    assert sorted(keys(seed=1)) == sorted(s["key"] for s in read_shards(tmp_path))

    dataset = ShardDataset(tmp_path, shuffle_buffer=4, seed=3, repeat=True)
    stream = iter(dataset)
    epochs = [[next(stream)["key"] for _ in range(N)] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]  # reshuffled per epoch
    again = iter(ShardDataset(tmp_path, shuffle_buffer=4, seed=3, repeat=True))
    assert [next(again)["key"] for _ in range(2 * N)] == epochs[0] + epochs[1]


def test_collate_stacks_and_lists():
    batch = collate([make_sample(0), make_sample(1)])
    assert batch["latents"].shape == (2, 4, 2, 3, 3) and batch["text_mask"].shape == (2, 5)
    assert batch["key"] == ["s0000", "s0001"] and batch["labels"] == [{}, {"shape": "square", "speed": 1}]
    with pytest.raises(ValueError, match="'text_emb'"):
        collate([make_sample(0), make_sample(1) | {"text_emb": torch.zeros(6, 8)}])
