"""Streaming speed paths: the generator's chunks equal the block-masked whole clip and come before their cache
write, compiled blocks equal eager ones without recompiling per layer or per window fill, the decode overlapped
on a second CUDA stream gives the sequential frames."""

import pytest
import torch

from distill.causal import CausalWanDenoiser, masked_sample, stream_sample
from distill.conditioning import Conditioning
from distill.schedule import schedule_to_dict
from distill.stream import StreamingConfig, StreamingGenerator, WanVAEDecoder
from teachers.wan import WanDenoiser


def _generator(times, cache_frames=4, source="tiny-random", size=16, decoder=None, device="cpu", context_noise=0.0,
               reencode_frames=0):
    model = CausalWanDenoiser.from_bidirectional(WanDenoiser.load(source).to(device), chunk_frames=2)
    config = StreamingConfig(transformer=dict(model.config), schedule=schedule_to_dict(model.schedule),
                             timesteps=times, chunk_frames=2, cache_frames=cache_frames,
                             latent_size=[model.latent_channels, size, size], text_encoder={"kind": "none"},
                             context_noise=context_noise, reencode_frames=reencode_frames)
    return StreamingGenerator(model, config, decoder=decoder)


def test_generator_chunks_equal_masked_whole_clip_and_precede_their_write():
    """One step per chunk (so the generator's noise draws are the clip's noise, chunk after chunk); the window holds
    the whole clip, so streaming must equal the block-masked forward."""
    generator, cond = _generator([1.0]), Conditioning(torch.randn(1, 5, 384))
    chunks = []
    for x0 in generator.stream_embeddings(lambda c: cond, 3, seed=7, decode=False):
        assert generator._cache.seen == 2 * len(chunks)  # handed over before its own cache write
        chunks.append(x0)
    assert generator._cache.seen == 4  # the last chunk's keys/values would serve no chunk
    draws = torch.Generator().manual_seed(7)
    noise = torch.cat([torch.randn(1, 3, 2, 16, 16, generator=draws) for _ in range(3)], dim=2)
    with torch.no_grad():
        masked = masked_sample(generator.model, noise, cond, [1.0])
    torch.testing.assert_close(torch.cat(chunks, dim=2), masked, atol=1e-5, rtol=1e-5)


def test_generator_writes_its_cache_at_its_context_noise():
    """The exported ``context_noise`` reaches the cache writes: the first chunk (no context) is unchanged, the
    next ones see re-noised context."""
    cond = Conditioning(torch.randn(1, 5, 384))
    clean, noisy = (list(_generator([1.0, 0.5], context_noise=level).stream_embeddings(lambda c: cond, 3, seed=7,
                                                                                      decode=False))
                    for level in (0.0, 0.3))
    assert torch.equal(clean[0], noisy[0])
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(clean[1:], noisy[1:]))
    with pytest.raises(ValueError, match="context_noise"):
        _generator([1.0], context_noise=1.0)


def test_generator_reencodes_its_window_as_stream_sample_does():
    """The exported ``reencode_frames`` reaches the generator's cache: its chunks are stream_sample's with a
    re-encoding cache (one step per chunk: the generator's noise draws are the clip's), not the rolling window's."""
    cond = Conditioning(torch.randn(1, 5, 384))
    generator = _generator([1.0], cache_frames=2, reencode_frames=2)
    chunks = torch.cat(list(generator.stream_embeddings(lambda c: cond, 4, seed=7, decode=False)), dim=2)
    draws = torch.Generator().manual_seed(7)
    noise = torch.cat([torch.randn(1, 3, 2, 16, 16, generator=draws) for _ in range(4)], dim=2)
    with torch.no_grad():
        reencoded, rolled = (stream_sample(generator.model, noise, cond, [1.0],
                                           cache=generator.model.new_cache(1, 16, 16, 2, reencode=reencode))
                             for reencode in (2, 0))
    torch.testing.assert_close(chunks, reencoded, atol=1e-5, rtol=1e-5)
    assert (chunks[:, :, 4:] - rolled[:, :, 4:]).abs().max() > 1e-3  # from the first restart on
    with pytest.raises(ValueError, match="reencode_frames = 4 must be 0 or whole chunks"):
        _generator([1.0], cache_frames=2, reencode_frames=4)


@pytest.mark.parametrize("reencode", [0, 2])
def test_compiled_blocks_equal_eager_without_recompiling(reencode):
    """The window's fill and the layer index stay out of the compiled graphs: one compile serves every layer and
    every chunk of a stream that fills and rolls (or re-encodes) its window."""
    model = CausalWanDenoiser.from_bidirectional(WanDenoiser.load("tiny-random"), chunk_frames=2).eval()
    noise, cond = torch.randn(1, 3, 8, 16, 16), Conditioning(torch.randn(1, 5, 384))

    def sample():
        cache = model.new_cache(1, 16, 16, capacity=4, sinks=2, reencode=reencode)
        return stream_sample(model, noise, cond, [1.0, 0.5], cache=cache, generator=torch.Generator().manual_seed(0))

    with torch.no_grad():
        eager = sample()
        torch._dynamo.reset()
        model.compile_blocks()
        try:
            with torch._dynamo.config.patch(error_on_recompile=True):
                compiled = sample()
        finally:
            torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_gpu_overlapped_decode_gives_the_sequential_frames():
    from diffusers import AutoencoderKLWan

    from eval.bench_streaming import TOY_WAN

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, num_res_blocks=1).cuda().eval()
    generator = _generator([1.0, 0.5], cache_frames=2, source=TOY_WAN, size=4, decoder=WanVAEDecoder(vae),
                           device="cuda")
    cond = Conditioning(torch.randn(1, 5, TOY_WAN["text_dim"], device="cuda"))
    videos = []
    for overlap in (False, True, False):
        generator.overlap_decode = overlap
        videos.append(torch.cat([f.cpu() for f in generator.stream_embeddings(lambda c: cond, 5, seed=1)]))
    assert videos[0].shape == (1 + 4 * 9, 32, 32, 3)
    assert all((video.int() - videos[0].int()).abs().max() <= 1 for video in videos[1:])
