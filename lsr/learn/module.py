"""`LsrModule`: the LightningModule behind `lsr fit` (blockwise scale learning) and `lsr validate` (perplexity).

fit: epochs run block by block (``method.epochs`` per block, 1 when not learning); block i starts at its first
epoch, is folded at its last, and the refined checkpoint is written after every block, so a killed run resumes at
the next block. The trainer stops itself after the last block (use ``max_epochs: -1``).
validate/test: perplexity of the ``fp``, ``rotated`` or ``fake_quant`` (refined checkpoint) model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import lightning as L
import torch

from lsr.learn.engine import BlockResult, BlockwiseEngine
from lsr.learn.method import MethodConfig
from lsr.learn.refined import apply_refined, load_refined, method_to_dict, save_refined
from lsr.learn.report import full_layer_mean_error, write_report
from lsr.metrics import Perplexity
from lsr.models import load_model
from lsr.transforms.linear import set_quantizers
from lsr.transforms.rotate import rotate_model

Variant = Literal["fp", "rotated", "fake_quant"]


class LsrModule(L.LightningModule):
    """Blockwise calibration of smoothing scales, and perplexity evaluation.

    Args:
        model: hub id, local HF directory, or ``smollm2`` (embedded).
        method: the method config (presets: quarot, smoothrot, quantile, lsr; see configs/).
        output_dir: where the refined checkpoint (scales + state) and the report go.
        batch_size: calibration windows per optimisation step.
        variant: what `validate`/`test` evaluate: ``fp``, ``rotated`` (exact, same perplexity) or ``fake_quant``
            (W4A4 with the refined checkpoint in ``output_dir``).
        resume: continue a killed run from ``output_dir`` when its config matches.
        dtype: weights and activations (float32 on CPU; bfloat16 on a GPU for large models).
    """

    def __init__(
        self,
        model: str = "smollm2",
        method: MethodConfig | None = None,
        output_dir: str = "runs/smollm2-lsr",
        batch_size: int = 4,
        variant: Variant = "fp",
        resume: bool = True,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    ) -> None:
        super().__init__()
        self.model_name = model
        self.method = method or MethodConfig()
        self.output_dir = Path(output_dir)
        self.batch_size = batch_size
        self.variant = variant
        self.resume = resume
        self.dtype_name = dtype
        self.engine: BlockwiseEngine | None = None
        self.__dict__["_lm"] = None  # not a submodule: Lightning must not move the whole LM to the accelerator
        self.ppl = Perplexity()
        self.save_hyperparameters({"model": model, "method": method_to_dict(self.method),
                                   "output_dir": output_dir, "calibration_batch_size": batch_size, "variant": variant,
                                   "dtype": dtype})

    # ----------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        if self.lm is not None:
            return
        self.__dict__["_lm"], _ = load_model(self.model_name, dtype=getattr(torch, self.dtype_name),
                                             with_tokenizer=False)
        if stage == "fit":
            self._setup_fit()
        elif self.variant == "rotated":
            rotate_model(self.lm, seed=self.method.seed)
        elif self.variant == "fake_quant":
            apply_refined(self.lm, self.output_dir)

    @property
    def lm(self) -> torch.nn.Module | None:
        """The causal LM; during fit only the block being learned sits on the accelerator (the engine moves it)."""
        return self.__dict__["_lm"]

    def _lm_to_device(self) -> None:
        self.lm.to(self.device)

    def on_validation_start(self) -> None:
        self._lm_to_device()

    def on_test_start(self) -> None:
        self._lm_to_device()

    def on_predict_start(self) -> None:
        self._lm_to_device()

    def _fingerprint(self) -> str:
        dm = self.trainer.datamodule
        data = {k: getattr(dm, k, None) for k in ("source", "seq_len", "num_calibration", "seed")}
        blob = json.dumps({"model": self.model_name, "method": method_to_dict(self.method), "data": data,
                           "batch_size": self.batch_size}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _setup_fit(self) -> None:
        windows = self.trainer.datamodule.calibration_windows()
        self.engine = BlockwiseEngine(
            self.lm, self.method, windows, device=self.trainer.strategy.root_device, batch_size=self.batch_size
        )
        self.first_block = 0
        if self.resume and (self.output_dir / "lsr_state.json").is_file():
            log_scales, state = load_refined(self.output_dir)
            if state.get("fingerprint") != self._fingerprint():
                raise ValueError(
                    f"{self.output_dir} holds a run with a different config; choose another output_dir "
                    "or pass --model.resume false to start over"
                )
            done = state["completed_blocks"]
            for index in range(done):
                self.engine.replay_block(index, log_scales)
            self.engine.results = [BlockResult(**r) for r in state["results"]]
            self.first_block = done
            print(f"resuming {self.output_dir}: {done}/{self.engine.num_blocks} blocks done")

    # ----------------------------------------------------------------- fit
    @property
    def epochs_per_block(self) -> int:
        return self.method.epochs if self.method.learn and self.method.epochs > 0 else 1

    def _position(self) -> tuple[int, int]:
        """(block, epoch within the block) of the current trainer epoch."""
        block, local = divmod(self.current_epoch, self.epochs_per_block)
        return self.first_block + block, local

    def configure_optimizers(self):
        params = list(self.engine.log_scales.parameters()) if self.engine else []
        return torch.optim.Adam(params or [torch.nn.Parameter(torch.zeros(1))], lr=self.method.lr)

    def on_train_epoch_start(self) -> None:
        block, local = self._position()
        if block >= self.engine.num_blocks:
            self.trainer.should_stop = True
            return
        if local == 0:
            self.engine.begin_block(block)
            self.block_stopped = False
        gen = torch.Generator().manual_seed(self.method.seed * 1_000_003 + block * 1_009 + local)
        self.order = torch.randperm(self.engine.num_samples, generator=gen)

    def training_step(self, batch: torch.Tensor, batch_idx: int):
        if not self.method.learn or self.engine.block is None or self.block_stopped:
            return None
        size = self.batch_size
        index = self.order[batch_idx * size : (batch_idx + 1) * size]
        if len(index) == 0:
            return None
        loss = self.engine.batch_loss(index)
        if not torch.isfinite(loss):
            self.engine.restore_best(f"non-finite loss {loss.item()}")
            self.block_stopped = True
            return None
        block, _ = self._position()
        self.log("block", float(block), prog_bar=True, on_step=True, on_epoch=False)
        self.log(f"loss/block_{block:02d}", loss, prog_bar=False, on_step=True, on_epoch=False)
        self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.engine.block is not None:
            self.engine.project()

    def on_train_epoch_end(self) -> None:
        block, local = self._position()
        if self.engine.block is None:
            return
        loss = self.engine.end_epoch()
        self._log_scalar(f"epoch_loss/block_{block:02d}", loss, local)
        if local == self.epochs_per_block - 1:  # a block stopped early idles through its remaining epochs
            result = self.engine.finish_block()
            self._on_block_done(result)
            if block + 1 >= self.engine.num_blocks:
                self.trainer.should_stop = True

    def _log_scalar(self, tag: str, value: float, step: int) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_scalar"):
            experiment.add_scalar(tag, value, step)

    def _on_block_done(self, result: BlockResult) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_scalar"):
            i = result.index
            experiment.add_scalar("block_mse/init", result.loss_init, i)
            experiment.add_scalar("block_mse/final", result.loss_final, i)
            for name, err in result.linear_error_before.items():
                experiment.add_scalar(f"linear_error_before/{name}", err, i)
            for name, err in result.linear_error_after.items():
                experiment.add_scalar(f"linear_error_after/{name}", err, i)
            experiment.add_scalar("full_layer_mean_error", full_layer_mean_error(self.engine.results), i)
            for point, theta in self.engine.log_scales[i].items():
                experiment.add_histogram(f"log_scales/{point}", theta.detach().cpu(), i)
        self._save_state()

    def _save_state(self) -> None:
        done = len([r for r in self.engine.results if r.linear_error_after])
        log_scales = {
            f"{i}.{p}": t for i in range(done) for p, t in self.engine.log_scales[i].items()
        }
        state = {
            "model": self.model_name,
            "method": method_to_dict(self.method),
            "completed_blocks": done,
            "num_blocks": self.engine.num_blocks,
            "fingerprint": self._fingerprint(),
            "results": [asdict(r) for r in self.engine.results],
        }
        save_refined(self.output_dir, log_scales, state)

    def on_fit_end(self) -> None:
        """Report, and leave the in-memory model as the refined fake-quant W4A4 model (for a following validate)."""
        if self.engine is None or not self.engine.results:
            return
        write_report(self.engine.results, self.output_dir, self.method.name)
        for layer in self.engine.adapter.layers(self.lm):
            set_quantizers(layer, self.method.act, self.method.weight)
        self.variant = "fake_quant"

    # ----------------------------------------------------------------- validate / test
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids).logits

    def _eval_step(self, batch: torch.Tensor, stage: str) -> None:
        self.ppl.update(self(batch), batch)
        self.log(f"{stage}/ppl", self.ppl, prog_bar=True, on_step=False, on_epoch=True)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._eval_step(batch, "test")
