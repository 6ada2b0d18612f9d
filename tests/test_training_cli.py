"""`sd35m-mlx train`: config file + flags, data folder checks, caching, checkpoints, validation, final LoRA."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sd35m_mlx_cli.main import cli


def _image(path, size=(96, 64), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _image(folder / "a.png", (96, 64), 0)
    (folder / "a.txt").write_text("a red fox\n")
    _image(folder / "b.jpg", (64, 64), 1)
    (folder / "b.txt").write_text("a blue house")
    return folder


def _train(*args):
    return CliRunner().invoke(cli, ["train", *args], catch_exceptions=False)


def test_train_writes_lora_checkpoints_validation_and_config(tiny_pipeline, data, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"rank": 2, "steps": 99, "learning_rate": 1e-3, "trigger_word": "zxq"}))
    out = tmp_path / "out"
    args = ["--data", str(data), "--output", str(out), "--model", str(tiny_pipeline), "--dtype", "float32"]
    args += ["--config", str(cfg), "--steps", "3", "--resolution", "64", "--save-every", "2", "-q"]
    result = _train(*args, "--validation-prompt", "zxq, a fox", "--validation-every", "2", "--gradient-checkpointing")
    assert result.exit_code == 0, result.output
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert not (out / "lora_kohya.safetensors").exists()  # only with --export-kohya (the resume run below)
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 3 and config["rank"] == 2 and config["learning_rate"] == 1e-3  # flag over file
    assert (out / "checkpoint-2" / "optimizer.safetensors").is_file() and (out / "checkpoint-3").is_dir()
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step000002-seed0.png", "step000003-seed0.png"]
    index = json.loads((out / "cache" / "index.json").read_text())
    assert [e["caption"] for e in index] == ["zxq, a red fox", "zxq, a blue house"]
    assert index[0]["bucket"] != index[1]["bucket"]  # 3:2 and 1:1 images go to different buckets
    # the same command again would overwrite this run and mix its checkpoints in: refused, nothing written
    lora_bytes = (out / "pytorch_lora_weights.safetensors").read_bytes()
    result = _train(*args)
    assert result.exit_code == 2 and f"output: {out} is not empty (cache" not in result.output
    assert f"output: {out} is not empty (checkpoint-2, checkpoint-3, config.json" in result.output
    assert "--resume" in result.output and "--overwrite" in result.output
    # a resume that changes what is trained, or ends before the checkpoint: refused, naming each setting
    result = _train(*args, "--resume", str(out / "checkpoint-2"), "--learning-rate", "5e-3", "--rank", "4")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "(learning_rate: 0.001 -> 0.005; rank: 2 -> 4)" in result.output
    result = _train(*args, "--resume", str(out / "checkpoint-2"), "--steps", "2")
    assert result.exit_code == 2 and "is at step 2 already; steps (2) must be more" in result.output
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == lora_bytes
    # resume from the step-2 checkpoint: the cache is reused, and the run ends at step 3 again
    result = _train(*args, "--resume", str(out / "checkpoint-2"), "--export-kohya")
    assert result.exit_code == 0, result.output
    assert (out / "lora_kohya.safetensors").is_file()
    # --overwrite replaces that run: its checkpoints, LoRA files and images go, the cache stays
    (out / "notes.txt").write_text("mine")
    result = _train(*args[:-7], "--steps", "1", "--resolution", "64", "--overwrite", "-q")
    assert result.exit_code == 0, result.output
    left = sorted(p.name for p in out.iterdir())
    assert left == ["cache", "checkpoint-1", "config.json", "notes.txt", "pytorch_lora_weights.safetensors"]


@pytest.mark.parametrize(
    "setup, message",
    [
        ("empty", "data: no images in"),
        ("no_caption", "data: c.png has no caption file c.txt (or pass --default-caption)"),
        ("unreadable", "data: cannot read image c.png"),
        ("tiny", "data: image c.png is too small (32x32"),
        ("latin1", "c.txt is not UTF-8 text (byte 0xe9 at offset 3); save it as UTF-8"),
    ],
)
def test_bad_data_folders_get_one_line_errors(tmp_path, setup, message):
    folder = tmp_path / "d"
    folder.mkdir()
    if setup == "no_caption":
        _image(folder / "c.png")
    elif setup == "unreadable":
        (folder / "c.png").write_bytes(b"not an image")
        (folder / "c.txt").write_text("x")
    elif setup == "latin1":
        _image(folder / "c.png")
        (folder / "c.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    elif setup == "tiny":
        _image(folder / "c.png", (32, 32))
        (folder / "c.txt").write_text("x")
    out = tmp_path / "out"
    result = _train("--data", str(folder), "--output", str(out), "--model", str(tmp_path / "unused"))
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists(), "nothing is written for bad data"


def test_default_caption_and_config_errors(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"rnak": 4}))
    result = _train("--data", str(folder), "--output", str(tmp_path / "o"), "--config", str(bad))
    assert result.exit_code == 2 and "config: unknown key 'rnak'" in result.output
    result = _train("--data", str(folder), "--output", str(tmp_path / "o"), "--rank", "0")
    assert result.exit_code == 2 and "rank must be a positive integer" in result.output
    for name, text, kind in (("c.json", '{"rank": 4,}', "JSON"), ("c.toml", "rank = = 4", "TOML")):
        broken = tmp_path / name
        broken.write_text(text)
        result = _train("--data", str(folder), "--output", str(tmp_path / "o"), "--config", str(broken))
        assert result.exit_code == 2, result.output
        assert f"config: {broken} is not valid {kind} (" in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_ctrl_c_says_where_the_checkpoint_is_and_exits_130(tiny_pipeline, data, tmp_path, monkeypatch):
    import signal

    from sd35m_mlx.training.trainer import Trainer

    step = Trainer.train_step

    def step_then_ctrl_c(self):
        loss = step(self)
        if self.step == 2:
            signal.raise_signal(signal.SIGINT)
        return loss

    monkeypatch.setattr(Trainer, "train_step", step_then_ctrl_c)
    out = tmp_path / "out"
    args = ["--data", str(data), "--output", str(out), "--model", str(tiny_pipeline), "--dtype", "float32"]
    result = _train(*args, "--steps", "5", "--rank", "2", "--resolution", "64")
    assert result.exit_code == 130, result.output
    assert "Ctrl-C: stopping after this step" in result.output
    assert f"Interrupted: checkpoint saved in {out / 'checkpoint-2'} (continue with --resume" in result.output
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "pytorch_lora_weights.safetensors").exists()
