"""The `lsr` CLI: every shipped YAML parses through the real LightningCLI; fit resumes after a crash."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from lsr.cli import build_cli, main
from lsr.learn.method import PRESETS
from lsr.learn.module import LsrModule
from tests.conftest import TINY, tiny_model

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_model_config_parses(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_method_configs_match_the_presets(name):
    cli = build_cli(["--config", str(CONFIGS / "smollm2.yaml"), "--config", str(CONFIGS / "methods" / f"{name}.yaml")],
                    run=False)
    method, expected = cli.model.method, PRESETS[name]
    for field in ("name", "rotate", "points", "statistic", "guard", "learn"):
        assert getattr(method, field) == getattr(expected, field), field


def test_bad_config_values_are_refused(capsys):
    with pytest.raises((SystemExit, ValueError)) as info:
        build_cli(["--config", str(CONFIGS / "smollm2.yaml"), "--model.method.alpha", "2.0"], run=False)
    assert "alpha must be in [0, 1], got 2.0" in str(info.value) + capsys.readouterr().err


class RandomWindows(L.LightningDataModule):
    """Calibration windows of random token ids (no tokenizer needed)."""

    def __init__(self, n: int = 8, seq_len: int = 16) -> None:
        super().__init__()
        self.source, self.seq_len, self.num_calibration, self.seed = "random", seq_len, n, 0
        gen = torch.Generator().manual_seed(0)
        self.windows = torch.randint(0, TINY["vocab_size"], (n, seq_len), generator=gen)

    def calibration_windows(self) -> torch.Tensor:
        return self.windows

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.windows, batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.windows, batch_size=4)


class Crash(L.Callback):
    """Kill the run when block `at` is about to start."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_epoch_start(self, trainer, module) -> None:
        if module.engine.block == self.at:
            raise RuntimeError("simulated crash")


def _fit(model_dir: Path, out: Path, callbacks=(), resume: bool = True) -> LsrModule:
    from lsr.learn.method import preset

    module = LsrModule(model=str(model_dir), method=preset("lsr", epochs=2), output_dir=str(out), batch_size=4,
                       resume=resume)
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                        check_val_every_n_epoch=1_000_000, num_sanity_val_steps=0)
    trainer.fit(module, RandomWindows())
    return module


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    tiny_model("llama").save_pretrained(path)
    return path


def test_fit_resumes_after_a_crash_with_identical_scales(tiny_dir, tmp_path):
    full = _fit(tiny_dir, tmp_path / "full")
    assert len(full.engine.results) == 2
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tiny_dir, tmp_path / "crashed", callbacks=[Crash(at=1)])
    state = (tmp_path / "crashed" / "lsr_state.json").read_text()
    assert '"completed_blocks": 1' in state
    _fit(tiny_dir, tmp_path / "crashed")
    a = load_file(tmp_path / "full" / "scales.safetensors")
    b = load_file(tmp_path / "crashed" / "scales.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 * 4
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for name in ("per_layer_error.json", "per_layer_error.md", "per_layer_error.png"):
        assert (tmp_path / "full" / name).is_file()


def test_resume_refuses_a_different_config(tiny_dir, tmp_path):
    _fit(tiny_dir, tmp_path / "run")
    from lsr.learn.method import preset

    module = LsrModule(model=str(tiny_dir), method=preset("quarot"), output_dir=str(tmp_path / "run"))
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="different config"):
        trainer.fit(module, RandomWindows())


def test_refined_checkpoint_applies_in_one_call(tiny_dir, tmp_path):
    from lsr import apply_refined
    from lsr.models import load_model

    module = _fit(tiny_dir, tmp_path / "run")
    ids = RandomWindows().windows[:2]
    with torch.no_grad():
        expected = module.lm(ids).logits  # the in-memory refined fake-quant model after fit
        model, _ = load_model(str(tiny_dir), with_tokenizer=False)
        got = apply_refined(model, tmp_path / "run")(ids).logits
    assert torch.allclose(expected, got, atol=1e-5)
