"""distill/attention: layout, patterns, index, backends against dense SDPA, the Wan processor, config."""

import pytest
import torch

import teachers
from distill import attention
from distill.attention import AttentionSpec, BlockSparse, TileLayout, patterns
from distill.attention.backends import flex, sdpa
from distill.attention.processor import block_pattern
from distill.attention.sparse import keep_index
from distill.attention.svg import choose_heads, sample_queries
from distill.conditioning import Conditioning
from distill.config import ConfigError, load_job


def test_tile_layout_round_trip_with_padding():
    layout = TileLayout((3, 5, 6), (2, 2, 4))
    assert layout.tiles == (2, 3, 2) and layout.padded_tokens == 12 * 16
    x = torch.randn(2, 90, 3, 4)
    tiled = layout.to_tiles(x)
    assert tiled.shape == (2, 192, 3, 4)
    torch.testing.assert_close(layout.from_tiles(tiled), x)
    grid = x.reshape(2, 3, 5, 6, 3, 4)
    torch.testing.assert_close(tiled[:, :16].reshape(2, 2, 2, 4, 3, 4), grid[:, :2, :2, :4])  # tile 0 contiguous
    assert layout.key_valid().sum() == 90
    assert TileLayout((4, 4, 4), (2, 2, 4)).key_valid() is None


def test_sliding_tile_keeps_a_constant_window():
    keep = patterns.sliding_tile((5, 4, 2), (3, 3, 3))
    assert keep.shape == (40, 40)
    assert (keep.sum(1) == 3 * 3 * 2).all()  # windows shift inward at borders; clipped to the axis length
    assert keep.diagonal().all()
    assert patterns.window_keep(5, 3)[0].tolist() == [True, True, True, False, False]


def test_chunk_causal_tiles_match_token_mask():
    grid, tile, chunk = (6, 2, 4), (2, 2, 2), 2
    layout = TileLayout(grid, tile)
    tokens = patterns.chunk_causal_tokens(grid, chunk)
    frame = torch.arange(6).repeat_interleave(8)
    assert torch.equal(tokens, (frame[None] // 2) <= (frame[:, None] // 2))
    tiled = layout.to_tiles(layout.to_tiles(tokens[None].float()).transpose(1, 2)).transpose(1, 2)[0] > 0
    assert torch.equal(BlockSparse(patterns.chunk_causal_tiles(layout, chunk), layout.block).token_mask[0], tiled)
    with pytest.raises(ValueError, match="multiple"):
        patterns.chunk_causal_tiles(TileLayout(grid, (4, 2, 2)), 2)


def test_index_and_transpose_reconstruct_the_mask():
    keep = torch.rand(3, 5, 5) < 0.4
    for mask in (keep, keep.transpose(1, 2)):
        idx, cnt = keep_index(mask)
        rebuilt = torch.zeros_like(mask)
        for h in range(3):
            for q in range(5):
                rebuilt[h, q, idx[h, q, :cnt[h, q]].long()] = True
        assert torch.equal(rebuilt, mask)
    sparse = BlockSparse(keep, 16)
    assert torch.equal(sparse.q_index[1], keep.sum(1, dtype=torch.int32))


def _problem(heads=2, tiles=4, block=16, dim=16, padded=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = (torch.rand(heads, tiles, tiles, generator=g) < 0.5) | torch.eye(tiles, dtype=torch.bool)
    valid = None
    if padded:
        valid = torch.ones(tiles * block, dtype=torch.bool)
        valid[block - 3:block] = False
    qkv = [torch.randn(2, heads, tiles * block, dim, generator=g, requires_grad=True) for _ in range(3)]
    return BlockSparse(keep, block, valid), qkv


def _dense_masked(q, k, v, sparse, scale):
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    return (scores.masked_fill(~sparse.token_mask, float("-inf")).softmax(-1) @ v.double()).float()


def _grads(fn, qkv, g):
    for x in qkv:
        x.grad = None
    out = fn(*qkv)
    out.backward(g)
    return [out.detach()] + [x.grad.clone() for x in qkv]


def test_sdpa_matches_dense_attention_under_the_mask():
    sparse, qkv = _problem()
    g = torch.randn_like(qkv[0])
    expected = _grads(lambda q, k, v: _dense_masked(q, k, v, sparse, 0.25), qkv, g)
    got = _grads(lambda q, k, v: sdpa(q, k, v, sparse, 0.25), qkv, g)
    for a, b, name in zip(got, expected, ["out", "dq", "dk", "dv"]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("padded", [True, False])
def test_flex_block_mask_matches_dense_attention(padded):
    sparse, qkv = _problem(heads=2 if padded else 1, padded=padded)  # CPU FlexAttention: forward only (no CPU backward)
    qkv = [x.detach() for x in qkv]
    torch.testing.assert_close(flex(*qkv, sparse, 0.25), _dense_masked(*qkv, sparse, 0.25), atol=2e-5, rtol=1e-4)


def test_svg_picks_the_head_pattern_with_the_smaller_error():
    q = 4.0 * torch.randn(1, 2, 64, 16)
    k = q.clone()
    k[:, 1] = q[:, 1].roll(16, dims=1)  # head 1: query token i matches key token i + 16, in the next tile
    own = torch.eye(4, dtype=torch.bool)
    candidates = torch.stack([own, own.roll(1, dims=1)])
    keep = choose_heads(q, k, torch.randn(1, 2, 64, 16), candidates, 16, None, sample_queries(64, 32, None, q.device),
                        0.25)
    assert torch.equal(keep[0], candidates[0]) and torch.equal(keep[1], candidates[1])


def _cond(batch=1):
    return Conditioning(torch.randn(batch, 5, 384, generator=torch.Generator().manual_seed(1)))


@pytest.fixture(scope="module")
def wan():
    return teachers.load("wan", "tiny-random")


def test_dense_processor_matches_diffusers(wan):
    x, t = torch.randn(1, 3, 3, 20, 24), torch.tensor([0.4])
    expected = wan(x, t, _cond())
    attention.install(wan, AttentionSpec(backend="flex"))
    try:
        torch.testing.assert_close(wan(x, t, _cond()), expected, atol=1e-5, rtol=1e-4)
        # a window covering the whole (padded) grid is dense attention through the tile layout
        attention.install(wan, AttentionSpec(pattern="tile", tile=[2, 2, 4], window=[9, 9, 9]))
        torch.testing.assert_close(wan(x, t, _cond()), expected, atol=1e-5, rtol=1e-4)
        attention.install(wan, AttentionSpec(pattern="tile", tile=[1, 4, 4], window=[1, 1, 1]))
        assert not torch.allclose(wan(x, t, _cond()), expected, atol=1e-3)
    finally:
        attention.uninstall(wan)
    torch.testing.assert_close(wan(x, t, _cond()), expected)


@pytest.mark.parametrize("pattern", ["tile_causal", "svg"])
def test_sparse_processor_trains(wan, pattern):
    spec = AttentionSpec(backend="triton", pattern=pattern, tile=[1, 4, 4], window=[1, 3, 3], chunk_frames=1)
    student = attention.install(teachers.load("wan", "tiny-random"), spec)
    x = torch.randn(1, 3, 3, 16, 24)
    student(x, torch.tensor([0.5]), _cond()).square().mean().backward()
    assert all(p.grad is not None for p in student.transformer.blocks[0].attn1.to_q.parameters())
    assert attention.installed_spec(student) is spec


def test_block_pattern_densities():
    layout = TileLayout((8, 8, 8), (2, 4, 4))
    tile = block_pattern(AttentionSpec(pattern="tile", tile=[2, 4, 4], window=[1, 1, 1]), layout)
    assert patterns.density(tile) == pytest.approx(1 / layout.num_tiles)
    both = block_pattern(AttentionSpec(pattern="tile_causal", tile=[2, 4, 4], window=[3, 3, 3], chunk_frames=2),
                         layout)
    window = block_pattern(AttentionSpec(pattern="tile", tile=[2, 4, 4], window=[3, 3, 3]), layout)
    frame_tile = layout.tile_coords()[:, 0]
    assert torch.equal(both, window & (frame_tile[None, :] <= frame_tile[:, None])) and not torch.equal(both, window)
    assert block_pattern(AttentionSpec(pattern="svg", tile=[2, 4, 4]), layout).shape == (2, 16, 16)


def test_job_attention_table_is_validated_and_saved(tmp_path, wan):
    job = load_job(None, ["attention.backend='flex'", "attention.pattern='tile'", "attention.tile=[2,4,4]"])
    assert job.attention.active and job.attention.block == 32
    for bad, key in [("attention.backend='xformers'", "attention.backend"),
                     ("attention.tile=[3,4,4]", "attention.tile"),
                     ("attention.pattern='chunk_causal'", "chunk_frames"), ("attention.colour=1", "colour")]:
        with pytest.raises(ConfigError, match=key):
            load_job(None, [bad])
    with pytest.raises(ValueError, match="critic"):
        attention.apply_to_roles(AttentionSpec(pattern="tile", roles=["critic"]), {"generator": wan})
    attention.save_spec(job.attention, tmp_path)
    model = attention.install_saved(teachers.load("wan", "tiny-random"), tmp_path)
    assert attention.installed_spec(model) == job.attention
    assert attention.install_saved(wan, tmp_path / "missing") is wan
