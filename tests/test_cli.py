"""The `lsr` CLI and the refined checkpoint: every shipped YAML parses, recipe configs are the presets, bad values end
in one line, fit -> validate -> export -> eval on a tiny saved model, resume after a crash, checkpoint reload."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lsr.checkpoint import load_checkpoint
from lsr.cli import build_config, main, parse
from lsr.data.config import DataConfig
from lsr.learn import LearnScales
from lsr.learn import fit as fit_recipe
from lsr.models import load_model
from lsr.models.loading import ModelConfig
from lsr.pipeline import apply_checkpoint
from lsr.recipe import PRESETS, Recipe
from tests.conftest import TINY, save_tiny

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
RECIPE_CONFIGS = sorted((CONFIGS / "recipes").glob("*.yaml"))
IDS = torch.randint(0, TINY["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------- configs
MODEL_CONFIGS = [[CONFIGS / "smollm2.yaml"], [CONFIGS / "llama3.yaml"]]


@pytest.mark.parametrize("command, configs", [("fit", c) for c in MODEL_CONFIGS]
                         + [("fit", [CONFIGS / "smollm2.yaml", p]) for p in RECIPE_CONFIGS]
                         + [(command, c) for command in ("run", "validate") for c in MODEL_CONFIGS],
                         ids=lambda v: "+".join(p.name for p in v) if isinstance(v, list) else v)
def test_every_config_parses(command, configs):
    """Every shipped YAML (recipes after smollm2.yaml); the model configs for every subcommand their docs name."""
    argv = [command] + [a for p in configs for a in ("--config", str(p))]
    parsed, cfg = parse(argv)
    assert parsed == command
    model, data = build_config(ModelConfig, cfg["model"]), build_config(DataConfig, cfg["data"])
    recipe = build_config(Recipe, cfg["recipe"])
    assert model.name and data.seq_len >= 2 and isinstance(recipe, Recipe)
    assert recipe.name in PRESETS and cfg["output_dir"]
    if command != "validate":
        assert cfg["trainer"]["accelerator"] in ("cpu", "gpu")


def test_print_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "smollm2.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed and "recipe:" in printed and "trainer:" in printed
    assert "method: gptq" in printed and "weights: float" in printed  # the preset's values, not lsr's defaults


def test_shipped_recipe_configs_cover_the_base_presets():
    assert {p.stem for p in RECIPE_CONFIGS} >= {"quarot", "smoothrot", "quantile", "lsr"}
    assert {p.stem for p in RECIPE_CONFIGS} <= set(PRESETS)


@pytest.mark.parametrize("path", RECIPE_CONFIGS, ids=lambda p: p.stem)
def test_recipe_configs_are_exactly_the_presets(path):
    _, cfg = parse(["fit", "--config", str(CONFIGS / "smollm2.yaml"), "--config", str(path)])
    assert Recipe.from_dict(cfg["recipe"]) == PRESETS[path.stem]
    assert build_config(Recipe, cfg["recipe"]) == PRESETS[path.stem]


def test_llama3_config_overrides_the_preset():
    _, cfg = parse(["fit", "--config", str(CONFIGS / "llama3.yaml")])
    recipe = build_config(Recipe, cfg["recipe"])
    assert recipe == Recipe.from_name("lsr-gptq", learn={"epochs": 10, "lr": 0.01, "schedule": "cosine",
                                                         "batch_size": 4})
    assert recipe.learn.weights == "float"  # the preset's, kept under the overrides


def test_command_line_overrides_a_preset():
    _, cfg = parse(["fit", "--config", str(CONFIGS / "smollm2.yaml"), "--recipe.name", "quarot-gptq",
                    "--recipe.weights.gptq.damp", "0.05", "--recipe.rotate.seed", "3"])
    assert build_config(Recipe, cfg["recipe"]) == Recipe.from_name(
        "quarot-gptq", weights={"gptq": {"damp": 0.05}}, rotate={"seed": 3})


# ----------------------------------------------------------------------------------------------- a tiny model
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny llama with a WordLevel tokenizer saved as an HF directory, and a text file of its words."""
    return save_tiny(tmp_path_factory.mktemp("tiny"))


def _fit_argv(tiny_dir, out: Path, *extra: str, epochs: str | None = "2") -> list[str]:
    model, text = tiny_dir
    learn = ["--recipe.learn.epochs", epochs] if epochs else []
    return ["fit", "--model.name", str(model), "--data.source", str(text), "--data.seq_len", "32",
            "--data.num_calibration", "4", "--data.cache_dir", str(out.parent / "cache"), "--output_dir", str(out),
            "--log_dir", str(out.parent / "logs"), "--trainer.accelerator", "cpu", *learn, *extra]


def _one_line_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = info.value.code
    assert isinstance(message, str), message
    err = capsys.readouterr().err
    assert "Traceback" not in message + err
    assert "\n" not in message.strip(), message
    return message


@pytest.mark.parametrize("extra, expected", [
    (["--recipe.weights.spec.bits", "1"], r"lsr fit: error: recipe\.weights\.spec\b.*bits must be an integer in "
                                          r"\[2, 8\], got 1"),
    (["--recipe.smooth.alpha", "2"], r"lsr fit: error: smooth\.alpha=2\.0 is invalid: expected a number in \[0, 1\]"),
    (["--recipe.learn.epochs", "0"], r"lsr fit: error: learn\.epochs=0 is invalid: expected an int >= 1"),
    (["--recipe.name", "nope"], r"lsr fit: error: recipe\.name='nope' is invalid: expected a preset \(quarot"),
    (["--recipe.smooth", "null"], "lsr fit: error: learn trains the smoothing scales"),
    (["--data.seq_len", "1"], r"lsr fit: error: data\.seq_len=1 is invalid: expected an int >= 2"),
    (["--data.seq_len", "100000"], r"lsr fit: error: the train split of data source '.*text\.txt' has \d+ tokens; "
                                   r"one window needs data\.seq_len=100000"),
    (["--data.source", "EMPTY"], r"lsr fit: error: text file .*empty\.txt is empty"),
])
def test_bad_values_end_in_one_line(tiny_dir, tmp_path, capsys, extra, expected):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    extra = [str(empty) if a == "EMPTY" else a for a in extra]
    message = _one_line_error(capsys, _fit_argv(tiny_dir, tmp_path / "run", *extra))
    assert re.fullmatch(expected + ".*", message), message
    assert not (tmp_path / "run").exists()  # refused before anything was written


@torch.no_grad()
def test_fit_validate_export_eval(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run, exported = tmp_path / "run1", tmp_path / "exp1"
    data = ["--data.source", str(tiny_dir[1]), "--data.seq_len", "32", "--data.max_eval_windows", "4",
            "--data.cache_dir", str(tmp_path / "cache")]
    main(_fit_argv(tiny_dir, run, "--recipe.learn.epochs", "1"))
    for name in ("recipe.json", "lsr_state.json", "scales.safetensors", "per_layer_error.json", "per_layer_error.md",
                 "per_layer_error.png"):
        assert (run / name).is_file(), name
    assert Recipe.from_dict(json.loads((run / "recipe.json").read_text())) == Recipe.from_name(
        "lsr", learn={"epochs": 1})
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))  # TensorBoard
    capsys.readouterr()
    main(["validate", "--model.name", str(tiny_dir[0]), *data, "--output_dir", str(run), "--variant", "fake_quant"])
    fake_quant = float(capsys.readouterr().out.split("val/ppl ")[1].split()[0])
    main(["validate", "--model.name", str(tiny_dir[0]), *data, "--variant", "rotated"])
    rotated = float(capsys.readouterr().out.split("val/ppl ")[1].split()[0])
    main(["validate", "--model.name", str(tiny_dir[0]), *data, "--variant", "fp"])
    fp = float(capsys.readouterr().out.split("val/ppl ")[1].split()[0])
    assert rotated == pytest.approx(fp, rel=1e-4) and fake_quant != pytest.approx(fp, rel=1e-4)
    main(["export", str(run), str(exported)])
    assert "recipe lsr" in capsys.readouterr().out
    config = json.loads((exported / "config.json").read_text())
    assert Recipe.from_dict(config["lsr"]["recipe"]) == Recipe.from_name("lsr", learn={"epochs": 1})
    assert config["lsr"]["source"] == {"model": str(tiny_dir[0]), "refined": str(run)}
    main(["eval", str(exported), *data, "--json", str(tmp_path / "eval.json")])
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["perplexity"]["windows"] == 4
    # the INT4 model scores what the fake-quant model does, up to the 16-bit embedding and lm_head
    assert result["perplexity"]["value"] == pytest.approx(fake_quant, rel=1e-2)
    message = _one_line_error(capsys, ["export", str(run), str(exported)])
    assert "exists" in message and "overwrite" in message


# ----------------------------------------------------------------------------------------------- resume
def test_fit_resumes_after_a_crash_with_identical_scales(tiny_dir, tmp_path, monkeypatch, capsys):
    main(_fit_argv(tiny_dir, tmp_path / "full"))
    original = LearnScales.on_block

    def crash(self, block):
        if block.index == 1:
            raise RuntimeError("simulated crash")
        original(self, block)

    with monkeypatch.context() as patch:
        patch.setattr(LearnScales, "on_block", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            main(_fit_argv(tiny_dir, tmp_path / "crashed"))
    state = json.loads((tmp_path / "crashed" / "lsr_state.json").read_text())
    assert state["completed_blocks"] == 1 and state["num_blocks"] == 2 and len(state["records"]) == 1
    capsys.readouterr()
    main(_fit_argv(tiny_dir, tmp_path / "crashed"))
    assert "resuming" in capsys.readouterr().out
    a, b = load_file(tmp_path / "full" / "scales.safetensors"), load_file(tmp_path / "crashed" / "scales.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 * (4 + 7)  # per block: 4 log-scales, 7 linears' act clips
    for key in a:
        assert torch.equal(a[key], b[key]), key
    full, crashed = (load_checkpoint(tmp_path / d) for d in ("full", "crashed"))
    assert full.recipe == crashed.recipe and full.state["fingerprint"] == crashed.state["fingerprint"]
    for key in ("completed_blocks", "num_blocks", "model", "format_version"):
        assert full.state[key] == crashed.state[key], key
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in full.state["records"]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in crashed.state["records"]]
    assert (tmp_path / "full" / "recipe.json").read_bytes() == (tmp_path / "crashed" / "recipe.json").read_bytes()
    for name in ("per_layer_error.json", "per_layer_error.md", "per_layer_error.png"):
        assert (tmp_path / "full" / name).is_file() and (tmp_path / "crashed" / name).is_file()
    with torch.no_grad():
        logits = [apply_checkpoint(load_model(str(tiny_dir[0]), with_tokenizer=False)[0], tmp_path / d).model(IDS)
                  .logits for d in ("full", "crashed")]
    assert torch.equal(*logits)


def test_resume_refuses_a_different_recipe(tiny_dir, tmp_path, capsys):
    main(_fit_argv(tiny_dir, tmp_path / "run"))
    before = (tmp_path / "run" / "lsr_state.json").read_text()
    message = _one_line_error(capsys, _fit_argv(tiny_dir, tmp_path / "run", "--recipe.name", "quarot",
                                                          epochs=None))
    assert "holds a run with a different model, recipe, data or trainer" in message
    for extra in (["--recipe.smooth.alpha", "0.4"], ["--recipe.learn.epochs", "3"], ["--data.num_calibration", "5"]):
        message = _one_line_error(capsys, _fit_argv(tiny_dir, tmp_path / "run", *extra))
        assert "different model, recipe" in message, extra
    assert (tmp_path / "run" / "lsr_state.json").read_text() == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    message = _one_line_error(capsys, _fit_argv(tiny_dir, tmp_path / "other"))
    assert "is not an lsr refined checkpoint" in message


def test_a_run_with_trainer_callbacks_is_found_again(tiny_dir, tmp_path, capsys):
    """The same command line (callbacks included) finds its own run: the fingerprint may not depend on objects."""
    argv = _fit_argv(tiny_dir, tmp_path / "run", "--trainer.callbacks",
                     '[{"class_path": "lightning.pytorch.callbacks.Timer"}]', epochs="1")
    main(argv)
    capsys.readouterr()
    main(argv)
    assert "finished run found, reusing it" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- reload
def _fit(tiny_dir, out: Path, recipe: Recipe):
    data = DataConfig(source=str(tiny_dir[1]), seq_len=32, num_calibration=4, cache_dir=str(out.parent / "cache"))
    return fit_recipe(ModelConfig(name=str(tiny_dir[0])), recipe, data, out, batch_size=2,
                      trainer={"accelerator": "cpu"}, log_dir=str(out.parent / "logs"))[0]


@torch.no_grad()
def test_refined_checkpoint_rebuilds_the_fake_quant_model(tiny_dir, tmp_path):
    result = _fit(tiny_dir, tmp_path / "run", Recipe.from_name("lsr", learn={"epochs": 2}))
    expected = result.model(IDS).logits  # the in-memory fake-quant model after fit
    model, _ = load_model(str(tiny_dir[0]), with_tokenizer=False)
    rebuilt = apply_checkpoint(model, tmp_path / "run")
    assert torch.equal(rebuilt.model(IDS).logits, expected)
    assert rebuilt.recipe == result.recipe and rebuilt.weights.keys() == result.weights.keys()
    for name, weight in result.weights.items():
        assert torch.equal(rebuilt.weights[name].q, weight.q) and torch.equal(rebuilt.weights[name].scale,
                                                                             weight.scale), name
    assert (tmp_path / "run" / "weights").exists()  # learned weight clips: the codes are stored
    rtn = _fit(tiny_dir, tmp_path / "rtn", Recipe.from_name("lsr", learn={"epochs": 1, "weight_clip": False}))
    assert not (tmp_path / "rtn" / "weights").exists()  # plain RTN weights are recomputed from the recipe
    assert torch.equal(apply_checkpoint(load_model(str(tiny_dir[0]), with_tokenizer=False)[0],
                                        tmp_path / "rtn").model(IDS).logits, rtn.model(IDS).logits)
    again = _fit(tiny_dir, tmp_path / "run", Recipe.from_name("lsr", learn={"epochs": 2}))  # finished: reused
    assert torch.equal(again.model(IDS).logits, expected)


@torch.no_grad()
@pytest.mark.parametrize("name", ["quantile-gptq", "quantile-gptaq"])
def test_gptq_checkpoint_stores_weights_and_reloads(tiny_dir, tmp_path, name):
    result = _fit(tiny_dir, tmp_path / "run", PRESETS[name])
    files = sorted(p.name for p in (tmp_path / "run" / "weights").iterdir())
    assert files == ["block_0000.safetensors", "block_0001.safetensors"]
    stored = load_checkpoint(tmp_path / "run").block_weights(1)
    assert set(stored) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert torch.equal(stored["mlp.down_proj"].q, result.weights["model.layers.1.mlp.down_proj"].q)
    model, _ = load_model(str(tiny_dir[0]), with_tokenizer=False)
    rebuilt = apply_checkpoint(model, tmp_path / "run")
    assert torch.equal(rebuilt.model(IDS).logits, result.model(IDS).logits)
    (tmp_path / "run" / "weights" / "block_0001.safetensors").unlink()
    with pytest.raises(ValueError, match="weights of block 1 are lost"):
        apply_checkpoint(load_model(str(tiny_dir[0]), with_tokenizer=False)[0], tmp_path / "run")


def test_unfinished_checkpoint_is_refused(tiny_dir, tmp_path, monkeypatch):
    original = LearnScales.on_block

    def crash(self, block):
        if block.index == 1:
            raise RuntimeError("simulated crash")
        original(self, block)

    monkeypatch.setattr(LearnScales, "on_block", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tiny_dir, tmp_path / "run", Recipe.from_name("lsr", learn={"epochs": 1}))
    with pytest.raises(ValueError, match="holds 1 of 2 blocks: the run did not finish"):
        apply_checkpoint(load_model(str(tiny_dir[0]), with_tokenizer=False)[0], tmp_path / "run")


def test_tensorboard_reads_at_a_glance(tiny_dir, tmp_path, capsys):
    """Init and final on one chart per quantity, learning curves continuing across blocks, no empty card."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    main(_fit_argv(tiny_dir, run, "--trainer.log_every_n_steps", "1"))
    charts: dict[str, dict[str, list]] = {}
    for events in (tmp_path / "logs").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values = acc.Scalars(tag)
            assert values, f"empty chart {tag}"
            charts.setdefault(tag, {})[events.parent.name] = sorted((v.step, v.value) for v in values)
    blocks = 2
    assert set(charts["block_error"]) == {"block_error_init", "block_error_learned", "block_error_final"}
    for name in ("q_proj", "o_proj", "down_proj"):
        lines = charts[f"linear_error/{name}"]
        assert set(lines) == {f"linear_error_{name}_init", f"linear_error_{name}_final"}
        assert all([step for step, _ in points] == list(range(blocks)) for points in lines.values())
    (curve,) = charts["train/relative_error"].values()
    steps = [step for step, _ in curve]
    assert steps == list(range(blocks * 2 * 4))  # 2 epochs x 4 windows per block, one step axis over all blocks
    assert all(0 < value < 1 for _, value in curve)  # relative errors, comparable across blocks
    assert "train/lr" in charts and "full_layer_mean_error" in charts
