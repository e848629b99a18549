"""The prompt-sensitivity diagnostic: its ideal change at t = 1 comes from the data's posterior means."""

import numpy as np

from distill.data.synthetic import sample_labels
from eval.prompt_sensitivity import mean_clip, sensitivity, swapped


def test_mean_clip_tells_attributes_apart_and_converges():
    rng = np.random.default_rng(0)
    labels = sample_labels(rng)
    recoloured = {**labels, "color": "red" if labels["color"] != "red" else "blue"}
    same = (mean_clip(labels, 400, rng, 8, 16, 16) - mean_clip(labels, 400, rng, 8, 16, 16)).abs().mean()
    other = (mean_clip(labels, 400, rng, 8, 16, 16) - mean_clip(recoloured, 400, rng, 8, 16, 16)).abs().mean()
    assert other > 4 * same
    changed = swapped(labels, "direction", rng)
    assert [k for k in labels if labels[k] != changed[k]] == ["direction"]


def test_sensitivity_rows_carry_the_ideal_change_at_t1():
    import teachers
    from distill.text import TextEncoder

    model = teachers.load("wan", "tiny-random").float().eval()
    encoder = TextEncoder.from_pretrained()
    rows = sensitivity(model, encoder, [0.5, 1.0], num=2, frames=2, height=16, width=16, posterior_clips=8)
    assert {r["t"] for r in rows} == {0.5, 1.0} and len(rows) == 2 * len({r["attribute"] for r in rows})
    assert all(("ideal_delta_x0" in r) == (r["t"] == 1.0) for r in rows)
    assert all(r["ideal_delta_x0"] > 0 for r in rows if r["t"] == 1.0)
