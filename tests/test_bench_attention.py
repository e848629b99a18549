"""eval/bench_attention.py runs end to end at tiny size on CPU (the GPU run writes the real numbers)."""

import json

from eval.bench_attention import main, window_for_density


def test_window_for_density_hits_the_target():
    window, density = window_for_density((21, 2, 7), 0.2)
    assert abs(density - 0.2) < 0.03 and all(w >= 1 for w in window)


def test_quick_bench_writes_results(tmp_path, capsys):
    out = tmp_path / "attention.json"
    main(["--quick", "--densities", "0.3", "--iters", "1", "--warmup", "0", "--out", str(out)])
    record = json.loads(out.read_text())
    rows = record["rows"]
    assert {r["backend"] for r in rows} == {"sdpa", "flex", "triton"}
    kernel = [r for r in rows if "model_size" not in r]
    assert {(r["backend"], r["pass"]) for r in kernel} == {(b, p) for b in ("sdpa", "flex", "triton")
                                                            for p in ("fwd", "fwdbwd")}
    sparse = [r for r in kernel if r["backend"] != "sdpa"]
    assert all(0 < r["density"] < 1 and r["ms"] > 0 and r["tflops_kept"] >= 0 for r in sparse)
    assert all(r["max_diff_flex_vs_triton"] < 1e-4 for r in sparse)
    assert len([r for r in rows if "model_size" in r]) == 6
    assert "TFLOP/s" in capsys.readouterr().out  # the table printed last


def test_quick_sweep_times_every_candidate(tmp_path, capsys):
    from distill.attention.triton_kernel import BWD_CANDIDATES, FWD_CANDIDATES

    out = tmp_path / "sweep.json"
    main(["--quick", "--sweep", "--iters", "1", "--warmup", "0", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    roles = [r.get("role") for r in rows]
    assert roles.count("fwd candidate") == len(FWD_CANDIDATES) and roles.count("bwd candidate") == len(BWD_CANDIDATES)
    assert {r["pass"] for r in rows if r.get("role") == "chosen"} == {"fwd", "fwdbwd"}
    assert all(r["ok"] and r["max_abs_diff"] < 1e-4 for r in rows if "role" in r)  # CPU: the SDPA reference ran
    assert "chosen" in capsys.readouterr().out


def test_gathered_reference_matches_masked_sdpa():
    """The sweep's float32 reference (kept blocks gathered chunk by chunk) against dense SDPA under the token
    mask, with a pattern per head, padding and chunks that do not divide the blocks."""
    import torch

    from distill.attention import BlockSparse
    from distill.attention.backends import sdpa
    from eval.bench_attention import reference

    g = torch.Generator().manual_seed(0)
    heads, tiles, block = 3, 5, 8
    keep = (torch.rand(heads, tiles, tiles, generator=g) < 0.5) | torch.eye(tiles, dtype=torch.bool)
    valid = torch.ones(tiles * block, dtype=torch.bool)
    valid[-3:] = False
    sparse = BlockSparse(keep, block, valid)
    q, k, v, grad = (torch.randn(2, heads, tiles * block, 16, generator=g, dtype=torch.float64) for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = sdpa(q, k, v, sparse, 0.25)
    expected = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    got = reference(q, k, v, sparse, 0.25, grad, chunk=2)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b.float(), atol=1e-5, rtol=1e-4)
