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
