"""The Triton block-sparse kernel against dense attention under the same mask: on CPU through Triton's
interpreter (a subprocess, since TRITON_INTERPRET must be set before Triton compiles anything), and on the
GPU in bf16 at kernel-sized blocks (``pytest -m gpu``)."""

import os
import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch

from distill.attention import BlockSparse
from distill.attention.backends import flex

ROOT = Path(__file__).resolve().parents[1]


def compare(batch: int, heads: int, tiles: int, block: int, dim: int, shared: bool, padded: bool,
            device: str = "cpu", dtype: torch.dtype = torch.float32, backend=None,
            strided: bool = False) -> list[float]:
    """Max errors of (out, dq, dk, dv) of ``backend(q, k, v, sparse, scale)`` (default: the Triton kernel)
    against float64 dense attention under the token mask, relative to the reference's largest magnitude."""
    from distill.attention.triton_kernel import block_sparse_attention

    g = torch.Generator().manual_seed(0)
    keep = (torch.rand(1 if shared else heads, tiles, tiles, generator=g) < 0.4) | torch.eye(tiles, dtype=torch.bool)
    valid = None
    if padded:
        valid = torch.ones(tiles * block, dtype=torch.bool)
        valid[block - 5:block] = False
        valid[-3:] = False
    sparse = BlockSparse(keep.to(device), block, None if valid is None else valid.to(device))
    qkv = [torch.randn(batch, heads, tiles * block, dim, generator=g) for _ in range(3)]
    grad = torch.randn(batch, heads, tiles * block, dim, generator=g)
    scale = dim ** -0.5

    def run(fn, tensors, grad):
        if strided:  # [B, N, H, D] memory seen as [B, H, N, D], as the processor passes it
            tensors = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in tensors]
        tensors = [x.detach().requires_grad_(True) for x in tensors]
        out = fn(*tensors)
        out.backward(grad)
        return [out.detach().double().cpu()] + [x.grad.double().cpu() for x in tensors]

    mask = sparse.token_mask.cpu()

    def dense(q, k, v):
        return ((q @ k.transpose(-1, -2)) * scale).masked_fill(~mask, float("-inf")).softmax(-1) @ v

    qkv, grad = [x.to(dtype) for x in qkv], grad.to(dtype)  # the reference sees the same rounded inputs
    expected = run(dense, [x.double() for x in qkv], grad.double())
    backend = backend or block_sparse_attention
    got = run(lambda q, k, v: backend(q, k, v, sparse, scale), [x.to(device) for x in qkv], grad.to(device))
    return [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, expected)]


_SCRIPT = """
from dataclasses import replace
from functools import partial
from distill.attention.triton_kernel import DEFAULT, KernelConfig, Launch, block_sparse_attention
from tests.test_attention_kernel import compare
tma = Launch(16, 16, 4, 1, tma=True)
fwd, dkdv = replace(DEFAULT.fwd, tma=False), replace(DEFAULT.dkdv, tma=False)
configs = [KernelConfig(fwd, dkdv, Launch(16, 16, 4, 1)),
           KernelConfig(tma, tma, tma)]  # streamed tiles by TMA descriptors ([B, N, H, D] memory in the 2nd case)
for config in configs:
    kernel = partial(block_sparse_attention, config=config)
    for case in [(1, 2, 4, 16, 16, False, True), (2, 3, 3, 32, 32, True, False)]:
        errors = compare(*case, strided=case[0] == 2, backend=kernel)
        assert max(errors) < 1e-5, (config, case, errors)
print("ok")
"""


def test_triton_kernel_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("block,dim,shared,padded", [(128, 128, True, True), (64, 128, False, False),
                                                      (64, 64, True, False)])
@pytest.mark.parametrize("backward", ["pointer loads", "tma"])
def test_triton_kernel_bf16_on_gpu(block, dim, shared, padded, backward):
    from distill.attention.triton_kernel import DEFAULT, KernelConfig, Launch, block_sparse_attention

    config = {"pointer loads": KernelConfig(Launch(128, 128, 8, 3), Launch(32, 64, 4, 3), Launch(128, 64, 8, 2)),
              "tma": DEFAULT}[backward]
    kernel = partial(block_sparse_attention, config=config)
    errors = compare(2, 4, 8, block, dim, shared, padded, device="cuda", dtype=torch.bfloat16, strided=shared,
                     backend=kernel)
    assert max(errors) < 2e-2, errors
    assert max(compare(1, 2, 4, block, dim, shared, padded, device="cuda", backend=kernel)) < 1e-4  # float32


@pytest.mark.gpu
def test_flex_backward_on_gpu():
    errors = compare(1, 2, 8, 128, 64, False, True, device="cuda", dtype=torch.bfloat16, backend=flex)
    assert max(errors) < 2e-2, errors


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "triton"])
def test_sparse_wan_on_gpu_matches_the_sdpa_reference(backend):
    """The whole processor on CUDA (layout, padding, RoPE, kernel, backward) against the masked-SDPA reference."""
    import teachers
    from distill import attention
    from distill.conditioning import Conditioning

    model = teachers.load("wan", "tiny-random").cuda()
    x, t = torch.randn(1, 3, 4, 30, 64, device="cuda"), torch.tensor([0.6], device="cuda")  # rows 15 -> 16 padded
    cond = Conditioning(torch.randn(1, 6, 384, device="cuda"))
    results = []
    for name in ("sdpa", backend):
        attention.install(model, attention.AttentionSpec(backend=name, pattern="tile", tile=[1, 8, 16],
                                                         window=[3, 1, 1]))
        model.zero_grad(set_to_none=True)
        out = model(x, t, cond)
        out.square().mean().backward()
        results.append((out.detach(), model.transformer.blocks[0].attn1.to_q.weight.grad.clone()))
    (ref_out, ref_grad), (out, grad) = results
    torch.testing.assert_close(out, ref_out, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(grad, ref_grad, atol=2e-4, rtol=2e-3)


@pytest.mark.gpu
def test_sparse_job_trains_on_gpu(tmp_path):
    from distill.config import load_job
    from distill.run import train

    job = load_job(ROOT / "jobs" / "sparse_tiny_dmd.toml", [f"output.dir='{tmp_path}'", "train.steps=3",
                                                            "data.pool=32", "data.batch_size=4"])
    out = train(job)
    assert (out / "attention.json").is_file()


def test_launches_fit_the_pattern_block():
    from distill.attention.triton_kernel import Launch

    assert Launch(128, 64, 8, 3).fit(128) == Launch(128, 64, 8, 3)
    assert Launch(128, 64, 8, 3).fit(64) == Launch(64, 64, 8, 3)
    assert Launch(128, 128, 8, 2).fit(32) == Launch(32, 32, 8, 2)


def _hopper_kernels() -> list[tuple]:
    """Every (kernel, launch, extra constants, dtype) that the candidate configs run at Wan's shapes, and the
    float32 reference launch of each kernel."""
    from distill.attention import triton_kernel as tk

    cases = {(tk._fwd, f, "bf16") for f in tk.FWD_CANDIDATES}
    for dkdv, dq in tk.BWD_CANDIDATES:
        cases |= {(tk._bwd_dkdv, dkdv, "bf16"), (tk._bwd_dq, dq, "bf16")}
    for ieee in (tk.IEEE_LAUNCH, replace(tk.IEEE_LAUNCH, tma=True)):
        cases |= {(kernel, ieee, "fp32") for kernel in (tk._fwd, tk._bwd_dkdv, tk._bwd_dq)}
    return sorted(cases, key=lambda c: (c[0].__name__, str(c[1]), c[2]))


def _case_id(value) -> str:
    return getattr(value, "__name__", str(value))


def test_default_config_is_a_candidate():
    from distill.attention import triton_kernel as tk

    assert tk.DEFAULT.fwd in tk.FWD_CANDIDATES and (tk.DEFAULT.dkdv, tk.DEFAULT.dq) in tk.BWD_CANDIDATES


@pytest.mark.parametrize("kernel,launch,dtype", _hopper_kernels(), ids=_case_id)
def test_kernels_compile_for_hopper(kernel, launch, dtype, tmp_path):
    """Compile (no GPU needed: Triton's bundled ptxas) each candidate launch for sm_90 at D = 128, blocks of 128
    with padding: catches what the interpreter does not (layouts, wgmma operand types, shared memory beyond the
    SM's, spilled registers) and checks that the tile loads are software-pipelined (cp.async) and bf16 dots use
    wgmma. Compiled kernels are cached (~/.triton), so only the first run pays for ptxas."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from distill.attention.triton_kernel import MAX_SHARED_BYTES

    pointers = {"LSE": "*fp32", "DELTA": "*fp32", "IDX": "*i32", "CNT": "*i32", "BIAS": "*fp32"}
    tensors = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
    fn = kernel
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    consts = dict(BLOCK=128, D=128, HAS_PAD=True, IEEE=dtype == "fp32", BLOCK_M=launch.block_m,
                  BLOCK_N=launch.block_n)
    streamed_rows = launch.block_n if fn.__name__ in ("_fwd", "_bwd_dq") else launch.block_m
    if launch.tma:  # the streamed tiles' descriptors (_streamed)
        pointers |= {a: f"tensordesc<{dtype}[{streamed_rows}, 128]>" for a in fn.arg_names if a.endswith("_TMA")}
    consts["TMA"] = launch.tma
    signature = {a: "constexpr" if a in consts else pointers.get(a, f"*{dtype}" if a in tensors or a.endswith("_TMA")
                                                               else "fp32" if "scale" in a else "i32")
                 for a in fn.arg_names}
    aligned = [i for i, a in enumerate(fn.arg_names)
               if signature[a].startswith("*") or a.startswith(("stride", "s_"))]  # as the JIT specialises
    source = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                       attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": launch.warps, "num_stages": launch.stages})
    ptx = compiled.asm["ptx"]
    assert ("cp.async.bulk.tensor" if launch.tma else "cp.async") in ptx  # the streamed tiles are pipelined copies
    assert "wgmma.mma_async" in ptx or dtype == "fp32"
    assert compiled.metadata.shared <= MAX_SHARED_BYTES, compiled.metadata.shared
    cubin = tmp_path / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(cubin)],
                           capture_output=True, text=True, check=True).stdout
    # spilled registers live on the stack (float32 is the reference path, not a speed path)
    assert " STACK:0 " in usage or dtype == "fp32", usage


def test_tma_reads_the_layouts_it_can_address_and_nothing_else():
    """TMA needs each (batch, head) slice as whole, 16-byte aligned row segments of the storage; anything else falls
    back to pointer loads (the launch's TMA constant is then off)."""
    from distill.attention.triton_kernel import _tma_ready

    x = torch.randn(2, 3, 64, 32, dtype=torch.bfloat16)
    assert _tma_ready(x)  # contiguous [B, H, N, D]
    assert _tma_ready(x.transpose(1, 2).contiguous().transpose(1, 2))  # [B, N, H, D] memory
    assert not _tma_ready(x.transpose(-1, -2).contiguous().transpose(-1, -2))  # D not innermost
    assert not _tma_ready(torch.randn(2 * 3 * 64 * 32 + 1, dtype=torch.bfloat16)[1:].view_as(x))  # misaligned
