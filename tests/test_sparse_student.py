"""The sparse student job: its pattern, a CPU-sized run that saves the pattern beside the student, and the
side-by-side evaluation that re-installs it."""

import json
from pathlib import Path

import torch

import teachers
from distill.attention import TileLayout, install_saved, installed_spec, load_spec, patterns
from distill.conditioning import Conditioning
from distill.config import load_job
from distill.export import export_diffusers
from distill.run import train
from eval.compare_students import main as compare

ROOT = Path(__file__).resolve().parents[1]
SPARSE = ["attention.backend='triton'", "attention.pattern='tile'", "attention.tile=[2,2,4]",
          "attention.window=[1,3,2]"]


def test_sparse_job_keeps_a_fraction_of_the_tiles():
    job = load_job(ROOT / "jobs" / "sparse_tiny_dmd.toml")
    assert job.attention.active and job.attention.roles == ["generator"] and job.model.family == "tiny"
    layout = TileLayout((job.data.frames, job.data.height // 4, job.data.width // 4), tuple(job.attention.tile))
    assert 0.2 < patterns.density(patterns.sliding_tile(layout.tiles, job.attention.window)) < 0.4


def test_sparse_student_trains_saves_and_evaluates_with_its_pattern(tmp_path):
    job = load_job(ROOT / "tests" / "jobs" / "tiny_dmd.toml", [f"output.dir='{tmp_path / 'run'}'", "train.steps=1",
                                                             *SPARSE])
    student_dir = train(job)
    assert load_spec(student_dir) == job.attention
    sparse = teachers.load_spec(str(student_dir))
    x, t = torch.randn(1, 3, 4, 32, 32), torch.tensor([0.5])
    cond = Conditioning(torch.randn(1, 4, 384))
    dense_out = sparse(x, t, cond)
    assert installed_spec(install_saved(sparse, student_dir)) == job.attention
    assert not torch.allclose(sparse(x, t, cond), dense_out, atol=1e-4)
    exported = export_diffusers(student_dir, tmp_path / "exported")  # the pattern travels with the export
    assert load_spec(exported) == job.attention
    out = tmp_path / "sparse.json"
    compare(["--student", f"sparse={student_dir}", "--num", "4", "--batch-size", "4", "--frames", "4",
             "--teacher-steps", "0", "--student-steps", "4", "1", "--device", "cpu", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["steps"]) for r in rows] == [("sparse", 4), ("sparse", 1)]
    assert rows[0]["attention"] == "triton:tile" and rows[0]["density"] == 0.375  # 2x4x2 tiles: 1/2 x 3/4 x 1
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
