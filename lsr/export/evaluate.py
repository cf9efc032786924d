"""Zero-shot tasks of a (loaded INT4 or any causal) model through lm-eval (perplexity: `lsr.metrics.perplexity`).

lm-eval is optional and imported lazily; without it, `run_lm_eval` raises `LmEvalUnavailable` with the reason, and
`lsr eval` says so and skips the tasks. Local task files (``--include_path``) work offline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LmEvalUnavailable(RuntimeError):
    """lm-eval is not installed (or not importable)."""


class LoglikelihoodScorer:
    """The scoring lm-eval needs, over any HF-style causal LM and tokenizer (no lm-eval import).

    Context/continuation pairs are tokenized as lm-eval's HFLM does (whole string, then split, with trailing
    whitespace of the context moved to the continuation); inputs longer than `max_length` keep their last tokens.
    """

    def __init__(self, model: nn.Module, tokenizer, *, max_length: int = 2048, device: str | torch.device = "cpu"):
        self.model, self.tokenizer, self.max_length, self.device = model, tokenizer, max_length, torch.device(device)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        return ctx, whole[len(ctx):]

    @torch.no_grad()
    def score(self, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation)."""
        if not continuation_ids:
            return 0.0, True
        if not context_ids:
            bos = getattr(self.tokenizer, "bos_token_id", None)
            bos = bos if bos is not None else getattr(self.tokenizer, "eos_token_id", 0)
            context_ids = [bos]
        ids = (context_ids + continuation_ids)[-(self.max_length + 1):]
        n = len(continuation_ids)
        inputs = torch.tensor([ids[:-1]], device=self.device)
        logits = self.model(inputs).logits[0, -n:].float()
        logprobs = F.log_softmax(logits, dim=-1)
        target = torch.tensor(ids[-n:], device=self.device)
        total = logprobs.gather(-1, target[:, None]).sum().item()
        return total, bool((logprobs.argmax(-1) == target).all())

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        return [self.score(*self.encode_pair(ctx, cont)) for ctx, cont in pairs]

    def loglikelihood_rolling(self, texts: list[str]) -> list[float]:
        """Sum of log p of every token of each text, in windows of `max_length` (no overlap)."""
        out = []
        for text in texts:
            ids = self._encode(text)
            total, start = 0.0, 0
            while start < len(ids):
                chunk = ids[start:start + self.max_length]
                total += self.score(ids[max(0, start - 1):start] if start else [], chunk)[0]
                start += self.max_length
            out.append(total)
        return out


def make_lm_eval_model(model: nn.Module, tokenizer, *, max_length: int = 2048, device: str | torch.device = "cpu"):
    """An ``lm_eval.api.model.LM`` over `model` (loglikelihood tasks; generation is not implemented)."""
    try:
        from lm_eval.api.model import LM
    except ImportError as err:
        raise LmEvalUnavailable(f"lm-eval is not installed ({err}); pip install lm-eval for zero-shot tasks") from err

    scorer = LoglikelihoodScorer(model, tokenizer, max_length=max_length, device=device)

    class LsrLM(LM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return scorer.loglikelihood([tuple(r.args) for r in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return scorer.loglikelihood_rolling([r.args[0] for r in requests])

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("lsr's lm-eval adapter scores loglikelihood tasks only")

    return LsrLM()


def run_lm_eval(
    model: nn.Module, tokenizer, tasks: list[str], *, include_path: str | None = None, limit: int | None = None,
    num_fewshot: int | None = None, max_length: int = 2048, device: str | torch.device = "cpu",
) -> dict[str, dict]:
    """Zero-shot (or few-shot) lm-eval tasks; returns lm-eval's per-task results."""
    lm = make_lm_eval_model(model, tokenizer, max_length=max_length, device=device)
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot)
    return results["results"]
