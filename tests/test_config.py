from pathlib import Path

import pytest

from distill.config import ConfigError, load_job, parse_override

JOBS = sorted((Path(__file__).parents[1] / "jobs").glob("*.toml")) + sorted((Path(__file__).parent / "jobs").glob("*.toml"))


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_every_job_file_loads(path):
    job = load_job(path)
    assert job.train.steps > 0


def test_overrides_take_toml_values():
    job = load_job(None, ["train.steps=7", "optim.lr=2e-4", "model.source=wan2.1-t2v-1.3b", "optim.betas=[0.8, 0.9]",
                          "method.weights={dmd=1.0, gan=0.1}"])
    assert job.train.steps == 7 and job.optim.lr == 2e-4 and job.model.source == "wan2.1-t2v-1.3b"
    assert job.optim.betas == [0.8, 0.9] and job.method.weights == {"dmd": 1.0, "gan": 0.1}
    assert parse_override("output.dir=runs/x") == (["output", "dir"], "runs/x")


@pytest.mark.parametrize("text, message", [
    ("[train]\nstepz = 3", r"job.toml: train: unknown key\(s\) \['stepz'\]"),
    ("[trainer]\nsteps = 3", r"unknown key\(s\) \['trainer'\]"),
    ("[train]\nsteps = 'many'", "train.steps: expected int, got str"),
    ("[train]\nsteps = 0", "train.steps must be > 0"),
    ("[deepspeed]\noffload = true", "offload needs deepspeed.zero_stage >= 1"),
    ("[deepspeed]\nzero_stage = 4", "zero_stage must be 0, 1, 2 or 3"),
    ("[data]\nkind = 'shards'", "needs data.path"),
    ("[schedule]\nkind = 'cosine'", "schedule.kind = 'cosine'"),
    ("[method]\ncfg_dropout = 1.5", "cfg_dropout must be in"),
    ("[optim]\nbetas = [0.9]", "betas must have two entries"),
    ("[model]\nconfig = 3", "model.config: expected a table"),
    ("[model]\ncoordinates = 1", "model.coordinates must be 0"),
    ("[model]\ncoordinates = 16\n[lora]\nrank = 4", "model.coordinates > 0 with lora.rank > 0"),
    ("train = [1, 2", "not valid TOML"),
])
def test_bad_job_files_name_file_and_key(tmp_path, text, message):
    path = tmp_path / "job.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_job(path)


def test_bad_overrides_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_job(None, ["train.steps"])
    with pytest.raises(ConfigError, match="train.ema_decay"):
        load_job(None, ["train.ema_decay=1.0"])
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        load_job(tmp_path / "missing.toml")
