"""Causal students: streaming with the KV cache equals the block-masked whole-clip forward, the rolling window
keeps memory flat, streaming generators round-trip through export."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distill.causal import CausalWanDenoiser, block_causal_mask, masked_sample, stream_sample
from distill.conditioning import Conditioning
from distill.stream import StreamingConfig, StreamingGenerator, export_streaming
from teachers.wan import WanDenoiser

TIMES = [1.0, 0.75, 0.5, 0.25]


@pytest.fixture(scope="module")
def causal():
    return CausalWanDenoiser.from_bidirectional(WanDenoiser.load("tiny-random"), chunk_frames=2).eval()


@pytest.fixture(scope="module")
def causal_coords():
    """With coordinate channels whose weights are random, not zero: a chunk's frame coordinate must matter."""
    model = WanDenoiser.load("tiny-random").with_coordinates(6)
    with torch.no_grad():
        model.transformer.patch_embedding.weight[:, 3:].normal_(std=0.2, generator=torch.Generator().manual_seed(5))
    return CausalWanDenoiser.from_bidirectional(model, chunk_frames=2).eval()


def _cond(batch=2, seed=0):
    return Conditioning(torch.randn(batch, 5, 384, generator=torch.Generator().manual_seed(seed)))


def test_block_mask_is_chunk_causal():
    mask = block_causal_mask(frames=4, tokens_per_frame=1, chunk_frames=2)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]


def test_mask_mode_is_causal_and_differs_from_bidirectional(causal):
    x, t, cond = torch.randn(1, 3, 6, 16, 16), torch.rand(1, 6), _cond(1)
    with torch.no_grad():
        y = causal(x, t, cond)
        x2 = x.clone()
        x2[:, :, 4:] += 1.0
        y2 = causal(x2, t, cond)
        bidirectional = WanDenoiser.load("tiny-random")(x2, t, cond)
    assert torch.equal(y[:, :, :4], y2[:, :, :4])  # earlier chunks never see later ones
    assert (y[:, :, 4:] - y2[:, :, 4:]).abs().max() > 1e-3
    assert (bidirectional[:, :, :4] - y2[:, :, :4]).abs().max() > 1e-3


@pytest.mark.parametrize("model,context_noise", [("causal", 0.0), ("causal_coords", 0.0), ("causal", 0.3)])
def test_streaming_equals_masked_whole_clip(model, context_noise, request):
    """Chunk by chunk with the KV cache (a chunk's RoPE and frame-coordinate positions at its place in the window)
    as over the whole clip with the block mask; with ``context_noise`` the cache holds re-noised chunks, as the
    masked forward sees them."""
    causal = request.getfixturevalue(model)
    noise, cond = torch.randn(2, 3, 6, 16, 16, generator=torch.Generator().manual_seed(1)), _cond()
    with torch.no_grad():
        streamed = stream_sample(causal, noise, cond, TIMES, generator=torch.Generator().manual_seed(2),
                                 context_noise=context_noise)
        masked = masked_sample(causal, noise, cond, TIMES, generator=torch.Generator().manual_seed(2),
                               context_noise=context_noise)
        clean = stream_sample(causal, noise, cond, TIMES, generator=torch.Generator().manual_seed(2))
    assert streamed.shape == noise.shape
    torch.testing.assert_close(streamed, masked, atol=1e-5, rtol=1e-5)
    assert torch.equal(streamed[:, :, :2], clean[:, :, :2])  # the first chunk has no context
    assert (streamed[:, :, 2:] - clean[:, :, 2:]).abs().max() > 1e-3 or not context_noise


def test_a_fresh_cache_is_not_written_after_the_last_chunk(causal, monkeypatch):
    """Self-Forcing's rollouts stream into a cache of their own: writing their last chunk would be a wasted forward."""
    writes = []
    write = CausalWanDenoiser.write_cache
    monkeypatch.setattr(CausalWanDenoiser, "write_cache", lambda *args: writes.append(write(*args)))
    noise, cond = torch.randn(1, 3, 6, 16, 16), _cond(1)
    with torch.no_grad():
        stream_sample(causal, noise, cond, TIMES[:2])
        assert len(writes) == 2
        cache = causal.new_cache(1, 16, 16, capacity=6)
        stream_sample(causal, noise, cond, TIMES[:2], cache=cache)  # a caller's cache goes on streaming
    assert len(writes) == 5 and cache.seen == 6


@pytest.mark.parametrize("sinks, window", [(0, [2, 3, 4, 5]), (2, [0, 1, 4, 5])])
def test_rolled_window_sees_training_positions(sinks, window):
    """After the window rolls, a chunk sees the cached frames (sinks first) at cache-relative RoPE positions
    0..n-1, as the masked model sees a clip made of them. One layer, so that cached keys/values depend only on
    their own frames (deeper layers' cached entries keep the context they were written with, by design)."""
    from teachers.wan import WAN_PRESETS

    one_layer = CausalWanDenoiser.from_bidirectional(
        WanDenoiser.from_config(dict(WAN_PRESETS["tiny-random"], num_layers=1)), chunk_frames=2).eval()
    noise, cond = torch.randn(1, 3, 8, 16, 16, generator=torch.Generator().manual_seed(3)), _cond(1)
    with torch.no_grad():
        cache = one_layer.new_cache(1, 16, 16, capacity=4, sinks=sinks)
        streamed = stream_sample(one_layer, noise, cond, [0.5], cache=cache)  # one step: no re-noising draws
        assert cache.frames == 6 and cache.seen == 8
        clip = torch.cat([streamed[:, :, window], noise[:, :, 6:]], 2)  # the window before the last chunk, then it
        reference = one_layer.denoise(clip, torch.tensor([[0.0, 0, 0, 0, 0.5, 0.5]]), cond)[:, :, 4:]
        absolute = one_layer.denoise(torch.cat([streamed[:, :, :6], noise[:, :, 6:]], 2),
                                     torch.tensor([[0.0] * 6 + [0.5] * 2]), cond)[:, :, 6:]
    torch.testing.assert_close(streamed[:, :, 6:], reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(streamed[:, :, 6:], absolute, atol=1e-3)  # the evicted frames are gone


@pytest.mark.parametrize("sinks, reencode, window", [(0, 4, [2, 3, 4, 5]), (0, 2, [4, 5]), (2, 2, [0, 1, 4, 5])])
def test_reencoded_window_equals_a_clip_of_its_frames(causal_coords, sinks, reencode, window):
    """With ``reencode``, a chunk after the window is full sees exactly what the masked model sees on a clip made
    of the sinks and the last ``reencode`` frames: every layer's keys and values, frame coordinates included, as
    at the opening of a training clip."""
    noise, cond = torch.randn(1, 3, 8, 16, 16, generator=torch.Generator().manual_seed(3)), _cond(1)
    with torch.no_grad():
        cache = causal_coords.new_cache(1, 16, 16, capacity=4, sinks=sinks, reencode=reencode)
        streamed = stream_sample(causal_coords, noise, cond, [0.5], cache=cache)
        assert cache.seen == 8 and len(cache.written) == reencode // 2  # replays are not new frames
        clip = torch.cat([streamed[:, :, window], noise[:, :, 6:]], 2)
        times = torch.tensor([[0.0] * len(window) + [0.5, 0.5]])
        reference = causal_coords.denoise(clip, times, cond)[:, :, -2:]
    torch.testing.assert_close(streamed[:, :, 6:], reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reencode", [0, 2])
def test_rolling_window_memory_is_flat(causal, reencode):
    """Ten times a 4-frame training length with a 2-frame sink: the cache buffers never grow or move, rolling or
    re-encoding (which keeps only the inputs of its last ``reencode`` frames)."""
    cache = causal.new_cache(1, 16, 16, capacity=4, sinks=2, reencode=reencode)
    pointers, size = [b.data_ptr() for b in (cache.k, cache.k_rot, cache.v)], cache.nbytes()
    noise, cond = torch.randn(1, 3, 40, 16, 16), _cond(1)
    with torch.no_grad():
        video = stream_sample(causal, noise, cond, TIMES[:2], cache=cache)
    assert torch.isfinite(video).all() and cache.seen == 40 and cache.frames == 6
    assert [b.data_ptr() for b in (cache.k, cache.k_rot, cache.v)] == pointers and cache.nbytes() == size
    assert len(cache.written) == reencode // 2


def _trained_dir(tmp_path, dtype=torch.float32, model=None, context_noise=None):
    model = model or WanDenoiser.load("tiny-random")
    out = model.save_pretrained(tmp_path / "model", dtype=dtype)
    causal = {"chunk_frames": 2, "train_frames": 6, "latent_size": [3, 16, 16]}
    if context_noise is not None:
        causal["context_noise"] = context_noise
    method = {"method": "dmd", "timesteps": TIMES, "causal": causal}
    (out / "method.json").write_text(json.dumps(method))
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_load_roundtrip_is_bitwise(tmp_path, dtype):
    out = export_streaming(_trained_dir(tmp_path, context_noise=0.1), tmp_path / "gen", dtype=dtype, sink_frames=0)
    config = StreamingConfig.read(out)
    assert config.cache_frames == 4 and config.chunk_frames == 2 and config.dtype == dtype
    assert config.context_noise == 0.1  # the student's cache writes, as it was trained
    generator = StreamingGenerator.from_pretrained(out, load_text_encoder=False)
    again = generator.save_pretrained(tmp_path / "again")
    first, second = load_file(str(out / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) and first[k].dtype == second[k].dtype for k in first)


def test_export_keeps_coordinate_channels_and_old_configs_load(tmp_path, causal_coords):
    out = export_streaming(_trained_dir(tmp_path, model=causal_coords), tmp_path / "gen")
    assert StreamingConfig.read(out).coordinate_frames == 6
    generator = StreamingGenerator.from_pretrained(out, load_text_encoder=False)
    assert generator.model.coordinate_frames == 6 and generator.model.latent_channels == 3
    x, t, cond = torch.randn(1, 3, 2, 16, 16), torch.tensor([0.5]), _cond(1)
    with torch.no_grad():
        torch.testing.assert_close(generator.model(x, t, cond), causal_coords(x, t, cond), atol=1e-6, rtol=1e-6)
    table = json.loads((out / "streaming.json").read_text())
    del table["coordinate_frames"]  # written before coordinate channels existed
    (out / "streaming.json").write_text(json.dumps(table))
    assert StreamingConfig.read(out).coordinate_frames == 0


def test_stream_yields_frames_with_changing_prompts(tmp_path):
    generator = StreamingGenerator.from_pretrained(export_streaming(_trained_dir(tmp_path), tmp_path / "gen"))
    chunks = list(generator.stream(["a red circle moving left", "a blue square moving up", "a red circle"], 3, seed=0))
    assert [c.shape for c in chunks] == [(2, 16, 16, 3)] * 3 and all(c.dtype == np.uint8 for c in chunks)
    again = list(generator.stream(["a red circle moving left", "a blue square moving up", "a red circle"], 3, seed=0))
    assert all(np.array_equal(a, b) for a, b in zip(chunks, again))  # seeded, cache reset between streams
    other = list(generator.stream("a red circle moving left", 3, seed=0))
    assert np.array_equal(other[0], chunks[0]) and not np.array_equal(other[1], chunks[1])


def test_cache_mode_with_gradient_matches_inference(causal):
    """Self-forcing's rollout (gradient through the last step of each chunk) computes what inference computes."""
    noise, cond = torch.randn(1, 3, 6, 16, 16), _cond(1)
    with_grad = stream_sample(causal, noise, cond, TIMES[:2], generator=torch.Generator().manual_seed(4),
                              grad_steps=[1, 1, 1])
    with torch.no_grad():
        inference = stream_sample(causal, noise, cond, TIMES[:2], generator=torch.Generator().manual_seed(4))
    assert with_grad.requires_grad
    torch.testing.assert_close(with_grad.detach(), inference, atol=1e-5, rtol=1e-5)
    with_grad.square().mean().backward()
    assert causal.transformer.blocks[0].attn1.to_k.weight.grad.abs().sum() > 0
    causal.zero_grad(set_to_none=True)


def test_streaming_benchmark_runs_at_toy_size(tmp_path):
    """eval/bench_streaming.py --tiny end to end on the CPU: a 16-channel toy Wan and a toy Wan VAE, every eager row
    (the old decode path, then each switch), each with a rolling window and with restarts."""
    from eval.bench_streaming import DECODE_STEPS, SWITCHES, main as bench
    from eval.results import gpu_slug

    out = tmp_path / "streaming.json"
    rows = bench(["--tiny", "--device", "cpu", "--out", str(out), "--cache-frames", "4", "--reencode-frames", "0", "2"])
    assert [r["includes_vae_decode"] for r in rows] == [False] * 2 + [True] * 2 * len(DECODE_STEPS)
    assert [(r["reencode_frames"], r["writes_per_restart"]) for r in rows[:2]] == [(0, 0), (2, 1)]
    assert not any(rows[2][s] for s in SWITCHES) and all(rows[-1][s] for s in SWITCHES if s != "channels_last")
    assert not any(r["compiled"] for r in rows)  # compiling is for CUDA unless --compile
    assert all(r["frames"] == 1 + 4 * (2 * 3 - 1) and r["resolution"] == "32x32" for r in rows[2:])  # 4x in time
    assert all(r["fps"] > 0 and r["first_chunk_latency_s"] > 0 for r in rows)
    assert json.loads(out.read_text())["rows"][0]["model_size"] == "toy"
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "h100"


def test_flex_attention_block_mask_matches_masked_sdpa():
    model = WanDenoiser.load("tiny-random")
    x, t, cond = torch.randn(1, 3, 4, 16, 16), torch.rand(1, 4), _cond(1)
    with torch.no_grad():
        sdpa = CausalWanDenoiser.from_bidirectional(model, 2, backend="sdpa")(x, t, cond)
        flex = CausalWanDenoiser.from_bidirectional(model, 2, backend="flex")(x, t, cond)
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_gpu_flex_training_and_bf16_streaming():
    """On CUDA: the FlexAttention mask mode (forward and backward) agrees with masked SDPA, and bf16 streaming
    with the KV cache agrees with the bf16 block-masked whole clip."""
    base = WanDenoiser.load("tiny-random").cuda()
    x, t, cond = torch.randn(2, 3, 8, 16, 16, device="cuda"), torch.rand(2, 8, device="cuda"), _cond().to("cuda")
    grads = []
    for backend in ("sdpa", "flex"):
        model = CausalWanDenoiser.from_bidirectional(base, 2, backend=backend)
        model.zero_grad(set_to_none=True)
        out = model(x, t, cond)
        out.square().mean().backward()
        grads.append((out.detach(), model.transformer.blocks[0].attn1.to_q.weight.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-4, rtol=1e-3)
    bf16 = CausalWanDenoiser.from_bidirectional(WanDenoiser.load("tiny-random", dtype=torch.bfloat16).cuda(), 2)
    noise = torch.randn(1, 3, 6, 16, 16, device="cuda")
    with torch.no_grad():
        streamed = stream_sample(bf16, noise, cond.index(slice(0, 1)), TIMES,
                                 generator=torch.Generator("cuda").manual_seed(0))
        masked = masked_sample(bf16, noise, cond.index(slice(0, 1)), TIMES,
                               generator=torch.Generator("cuda").manual_seed(0))
    assert (streamed - masked).abs().mean() < 2e-2 and (streamed - masked).abs().max() < 0.25


@pytest.mark.parametrize("batch_frames, channels_last", [(False, False), (True, False), (True, True)])
def test_wan_vae_decodes_chunk_by_chunk_as_the_whole_clip(batch_frames, channels_last):
    """Every decoder switch, on uneven chunks (the stream's first frame inside a chunk, a one-frame chunk)."""
    from diffusers import AutoencoderKLWan

    from distill.stream import WanVAEDecoder

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, num_res_blocks=1).eval()
    decoder = WanVAEDecoder(vae, batch_frames=batch_frames, channels_last=channels_last)
    latents = torch.randn(1, 16, 6, 2, 2)
    with torch.no_grad():
        whole = vae.decode(latents * decoder.std + decoder.mean).sample
        decoder.reset()
        streamed = torch.cat([decoder(latents[:, :, part]) for part in (slice(0, 3), slice(3, 4), slice(4, 6))], 2)
    assert streamed.shape == whole.shape == (1, 3, 1 + 4 * 5, 16, 16)
    torch.testing.assert_close(streamed, whole, atol=1e-5, rtol=1e-5)
