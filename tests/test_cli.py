import subprocess
import sys

from distill.cli import main
from distill.data.shards import read_shards
from distill.video import read_video


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "distill.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("data", "train", "sample"):
        assert command in out.stdout


def test_data_synth_writes_readable_shards(tmp_path):
    main(["data", "synth", "--out", str(tmp_path), "--num", "5", "--shard-size", "2", "--frames", "4"])
    samples = list(read_shards(tmp_path, on_error="raise"))
    assert len(samples) == 5 and len(list(tmp_path.glob("*.tar"))) == 3
    first = samples[0]
    assert first["latents"].shape == (3, 4, 32, 32) and first["text_emb"].shape == (32, 384)
    assert first["text_mask"].dtype.is_floating_point is False and set(first["labels"]) >= {"shape", "color"}
    assert first["caption"]


def test_sample_writes_a_video_from_a_free_form_prompt(tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    main(["sample", "--teacher", "tiny-random", "--prompt", "a purple dragon flies over the sea", "--steps", "2",
          "--frames", "4", "--scale", "2", "--out", str(out), "--device", "cpu"])
    video = read_video(out)
    assert video.shape == (4, 64, 64, 3)
    assert "2 steps" in capsys.readouterr().out


def test_bad_input_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "distill.cli", "sample", "--teacher", str(tmp_path / "nope"),
                             "--prompt", "x", "--out", str(tmp_path / "x.mp4")], capture_output=True, text=True)
    assert result.returncode != 0 and "neither a preset" in result.stderr
    result = subprocess.run([sys.executable, "-m", "distill.cli", "train", str(tmp_path / "missing.toml")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "missing.toml does not exist" in result.stderr
