"""LoRA-only distillation: adapters on one frozen base, switched per call, trained through the real trainer,
exported in diffusers' LoRA format and loaded by a stock WanPipeline."""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.cli import main
from distill.conditioning import Conditioning
from distill.config import ConfigError, LoraSettings, load_job
from distill.lora import LORA_FILE, LoraView, SharedBase, load_student, merge_lora, to_diffusers_lora
from eval.evaluate import load_sampler
from teachers.wan import WanDenoiser

JOBS = Path(__file__).parent / "jobs"


def _inputs(batch=2, text_dim=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 2, 8, 8, generator=g)
    cond = Conditioning(torch.randn(batch, 5, text_dim, generator=g), negative_text=torch.zeros(batch, 5, text_dim))
    return x, torch.rand(batch, generator=g), cond


def _views(rank=4, alpha=8.0):
    """A tiny random Wan base with a generator and a critic adapter, both with random (non-zero) weights."""
    shared = SharedBase(WanDenoiser.load("tiny-random"), LoraSettings(rank=rank, alpha=alpha))
    teacher = LoraView(shared)
    generator, critic = teacher.new_view().adapt("generator"), teacher.new_view().adapt("critic")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in [*generator.parameters(), *critic.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return teacher, generator, critic


def test_views_switch_adapters_and_own_disjoint_parameters():
    original = WanDenoiser.load("tiny-random")
    teacher, generator, critic = _views()
    x, t, cond = _inputs()
    with torch.no_grad():
        reference, base_out = original(x, t, cond), teacher(x, t, cond)
        gen_out, critic_out = generator(x, t, cond), critic(x, t, cond)
    torch.testing.assert_close(base_out, reference)  # the teacher is the base with adapters off
    assert (gen_out - base_out).abs().max() > 1e-3 and (gen_out - critic_out).abs().max() > 1e-3
    assert list(teacher.parameters()) == []
    gen_ids, critic_ids = {id(p) for p in generator.parameters()}, {id(p) for p in critic.parameters()}
    base_ids = {id(p) for n, p in teacher.shared.base.named_parameters() if "lora_" not in n}
    assert gen_ids and critic_ids and not gen_ids & critic_ids and not (gen_ids | critic_ids) & base_ids
    assert all(n.startswith("lora.transformer.blocks.") for n, _ in generator.named_parameters())
    # the base's own methods run under the view's adapter
    assert generator.features(x, t, cond).shape[-1] == generator.feature_dim
    with torch.no_grad():
        assert not torch.equal(generator.features(x, t, cond), teacher.features(x, t, cond))


def _generator_grads(generator, teacher, critic, x, t, cond):
    """Generator adapter gradients of a loss whose backward runs after the teacher and critic ran."""
    generator.zero_grad(set_to_none=True)
    out = generator(x, t, cond)
    with torch.no_grad():
        teacher(x, t, cond), critic(x, t, cond)
    out.square().mean().backward()
    assert all(p.grad is None for p in critic.parameters())
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in generator.parameters()]


def test_gradient_checkpointing_recomputes_under_the_adapter_of_the_forward():
    teacher, generator, critic = _views()
    x, t, cond = _inputs()
    plain = _generator_grads(generator, teacher, critic, x, t, cond)
    generator.enable_gradient_checkpointing()
    checkpointed = _generator_grads(generator, teacher, critic, x, t, cond)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)
    # diffusers' default checkpointing recomputes under whatever adapter is active at backward time (none)
    teacher.shared.base.transformer.enable_gradient_checkpointing()
    with pytest.raises(torch.utils.checkpoint.CheckpointError, match="different number of tensors"):
        _generator_grads(generator, teacher, critic, x, t, cond)


def test_lora_settings_are_validated():
    with pytest.raises(ConfigError, match="lora.init = 'pissa'.*rewrite the base"):
        load_job(JOBS / "tiny_dmd.toml", ["lora.rank=4", "lora.init='pissa'"])
    with pytest.raises(ConfigError, match="zero_stage 0-2"):
        load_job(JOBS / "tiny_dmd.toml", ["lora.rank=4", "deepspeed.zero_stage=3"])
    with pytest.raises(ConfigError, match="lora: unknown key"):
        load_job(JOBS / "tiny_dmd.toml", ["lora.rnak=4"])
    with pytest.raises(ConfigError, match="EMA target"):
        load_job(JOBS / "tiny_cd.toml", ["lora.rank=4"])
    with pytest.raises(ConfigError, match="causal = true with lora.rank > 0"):
        load_job(JOBS / "tiny_causal.toml", ["lora.rank=4"])


def test_views_reach_base_modules_as_they_are_and_load_student_takes_only_lora_dirs(tmp_path):
    teacher, generator, _ = _views()
    assert generator.transformer is teacher.shared.base.transformer  # a module, not a wrapped call
    assert generator.transformer.config.num_layers == teacher.shared.base.config.num_layers
    with pytest.raises(FileNotFoundError, match="not a LoRA student directory"):
        load_student(tmp_path)


@pytest.fixture
def recorded_trainers(monkeypatch):
    """Trainers made by ``distill.run.train``, kept for inspection after the run."""
    import distill.run
    from distill.trainer import Trainer

    made = []

    class Recording(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(distill.run, "Trainer", Recording)
    return made


def test_lora_dmd_trains_only_adapters_and_exports_a_lora(tmp_path, recorded_trainers):
    from distill.run import build_model, train

    overrides = [f"output.dir='{tmp_path}'", "lora.rank=4", "lora.alpha=8", "deepspeed.zero_stage=2",
                 "model.gradient_checkpointing=true", "method.weights={dmd=1.0, gan=0.1}"]
    job = load_job(JOBS / "tiny_dmd.toml", overrides)
    out = train(job)
    (trainer,) = recorded_trainers
    base = trainer.nets["teacher"].shared.base
    initial = build_model(job).state_dict()  # seeded: the weights the run started from
    now = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if "lora_" not in k}
    assert now.keys() == initial.keys() and all(torch.equal(now[k], initial[k]) for k in initial)
    owners: dict[int, str] = {}
    for role, engine in trainer.engines.items():
        named = dict(engine.module.named_parameters())
        # adapters only; the GAN term's discriminator is its own role holding only its heads
        assert all(n.startswith("heads.") if role == "discriminator" else n.startswith("lora.") for n in named)
        held = sum(p.numel() for group in engine.optimizer.bit16_groups for p in group)  # ZeRO-2's flat groups
        assert held == sum(p.numel() for p in named.values())
        for p in named.values():
            assert owners.setdefault(id(p), role) == role
    adapters = {n for n, _ in base.named_parameters() if "lora_" in n}
    assert {n.split(".")[-2] for n in adapters} == {"generator", "critic"}
    lora = load_file(str(out / LORA_FILE))
    assert lora and all(k.startswith("transformer.blocks.") and ".lora_" in k for k in lora)
    assert any(v.abs().max() > 0 for k, v in lora.items() if ".lora_B." in k)  # trained away from B = 0
    assert json.loads((out / "method.json").read_text())["method"] == "dmd+gan"

    student = load_student(out)  # the recorded base (the job's config) with the LoRA merged in
    _, t, cond = _inputs()
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        expected = student(x, t, cond)
        assert not torch.allclose(expected, build_model(job)(x, t, cond))
    main(["export", "--format", "lora", "--model", str(out), "--out", str(tmp_path / "lora")])
    assert load_file(str(tmp_path / "lora" / LORA_FILE)).keys() == lora.keys()
    assert "load_lora_weights" in (tmp_path / "lora" / "README.md").read_text()
    main(["export", "--format", "diffusers", "--model", str(out), "--out", str(tmp_path / "fused")])
    fused = WanDenoiser.from_pretrained(tmp_path / "fused")
    with torch.no_grad():
        torch.testing.assert_close(fused(x, t, cond), expected)
    sampler = load_sampler(out, torch.device("cpu"), guidance=1.0)  # eval's sampler of a model directory
    assert sampler(cond, torch.randn(2, 3, 4, 32, 32)).shape == (2, 3, 4, 32, 32)
    with pytest.raises(SystemExit, match="not a LoRA run"):
        main(["export", "--format", "lora", "--model", str(tmp_path / "fused" / "transformer"),
              "--out", str(tmp_path / "x")])


def test_lora_flow_matching_trains_an_adapter(tmp_path, recorded_trainers):
    from distill.run import train

    out = train(load_job(JOBS / "tiny_flow.toml", [f"output.dir='{tmp_path}'", "lora.rank=2", "train.steps=2"]))
    (trainer,) = recorded_trainers
    assert list(trainer.engines) == ["generator"] and trainer.nets["generator"].adapter == "generator"
    assert (out / LORA_FILE).is_file()


def test_lora_file_loads_in_a_stock_wan_pipeline(tmp_path):
    """diffusers' WanPipeline.load_lora_weights reads the exported file; unfused and fused, it generates what
    the merged student generates, and the merged student is what the adapter computed in training."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate("a red ball moves left".split())}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                               num_heads=4, relative_attention_num_buckets=8)).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32).eval()

    shared = SharedBase(WanDenoiser(copy.deepcopy(transformer)), LoraSettings(rank=4, alpha=2.0))
    generator = LoraView(shared).new_view().adapt("generator")
    with torch.no_grad():
        for p in generator.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    lora = to_diffusers_lora(generator.state_dict(), 2.0 / 4, torch.float32)
    save_file(lora, str(tmp_path / LORA_FILE))
    merged = merge_lora(WanDenoiser(copy.deepcopy(transformer)), lora)
    x, t = torch.randn(1, 16, 2, 4, 4), torch.rand(1)
    cond = Conditioning(torch.randn(1, 6, 32))
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, cond), generator(x, t, cond), atol=1e-5, rtol=1e-4)

    def run(pipe):
        return pipe("a red ball moves left", negative_prompt="", height=16, width=16, num_frames=5,
                    num_inference_steps=2, guidance_scale=1.0, output_type="pt", max_sequence_length=8,
                    generator=torch.Generator().manual_seed(0)).frames

    parts = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                 scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    plain = run(WanPipeline(transformer=copy.deepcopy(transformer), **parts))
    expected = run(WanPipeline(transformer=merged.transformer, **parts))
    pipe = WanPipeline(transformer=transformer, **parts)
    pipe.load_lora_weights(str(tmp_path), adapter_name="student")
    unfused = run(pipe)
    pipe.fuse_lora()
    fused = run(pipe)
    assert (expected - plain).abs().max() > 1e-3  # the LoRA changes the video
    torch.testing.assert_close(unfused, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused, expected, atol=1e-4, rtol=1e-4)


def test_memory_benchmark_runs_full_and_lora_through_the_trainer(tmp_path, monkeypatch, capsys):
    """eval/bench_memory.py at its CPU size (the GPU run measures Wan2.1 1.3B the same way); the modes run
    in this process here instead of one process each."""
    from eval import bench_memory

    monkeypatch.setattr(bench_memory, "run_mode",
                        lambda args, mode: bench_memory.measure(args.size, mode, args.rank, args.steps, args.warmup))
    out = tmp_path / "memory.json"
    bench_memory.main(["--tiny", "--steps", "1", "--rank", "8", "--out", str(out)])
    rows = {row["mode"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"full", "lora"} and all(r["step_s"] > 0 and r["peak_gib"] > 0 for r in rows.values())
    # full: generator + critic, each a whole copy; LoRA: two rank-8 adapters
    assert rows["lora"]["trainable_params"] < rows["full"]["trainable_params"]
    assert "lora / full" in capsys.readouterr().out


def test_lora_job_files_load_and_the_tiny_one_runs_on_cpu(tmp_path):
    from distill.run import train

    wan = load_job(Path(__file__).parents[1] / "jobs" / "wan21_t2v_1.3b_dmd_lora.toml")
    assert wan.lora.rank == 64 and wan.model.gradient_checkpointing and wan.deepspeed.zero_stage == 2
    overrides = [f"output.dir='{tmp_path}'", "train.device='cpu'", "data.frames=4", "data.batch_size=1",
                 "data.pool=0", "data.height=16", "data.width=16", "lora.rank=4", "train.steps=1",
                 "method.critic_steps=1", "logging.every=1", "logging.progress=false"]
    out = train(load_job(Path(__file__).parents[1] / "jobs" / "lora_tiny_dmd.toml", overrides))
    assert (out / LORA_FILE).is_file() and json.loads((out / "lora.json").read_text())["base"]["family"] == "tiny"


@pytest.mark.gpu
def test_lora_dmd_in_bf16_on_gpu(tmp_path, recorded_trainers):
    """The GPU path: bf16 base and adapters, ZeRO-2, gradient checkpointing (``pytest -m gpu``). No GAN terms:
    losses/dmd.py's FeatureHead feeds float32 tokens to its bf16 weights under DeepSpeed bf16 (a known issue)."""
    from distill.run import train

    overrides = [f"output.dir='{tmp_path}'", "train.device='cuda'", "deepspeed.precision='bf16'",
                 "model.dtype='bfloat16'", "lora.rank=8", "deepspeed.zero_stage=2", "model.gradient_checkpointing=true",
                 "train.steps=3"]
    out = train(load_job(JOBS / "tiny_dmd.toml", overrides))
    (trainer,) = recorded_trainers
    for engine in trainer.engines.values():
        assert all(p.is_cuda and p.dtype == torch.bfloat16 for p in engine.module.parameters())
    base = trainer.nets["teacher"].shared.base
    assert all(p.is_cuda and not p.requires_grad for n, p in base.named_parameters() if "lora_" not in n)
    lora = load_file(str(out / LORA_FILE))
    assert all(torch.isfinite(v).all() for v in lora.values())
    assert any(v.abs().max() > 0 for k, v in lora.items() if ".lora_B." in k)
