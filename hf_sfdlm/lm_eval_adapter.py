"""lm-evaluation-harness model class for diffusion language models, registered as ``sfdlm``.

    import lm_eval
    import hf_sfdlm.lm_eval_adapter  # registers "sfdlm"
    lm_eval.simple_evaluate(model="sfdlm", model_args="pretrained=path/to/model,num_samples=32", tasks=[...])

or pass an `SFDLMEvalHarnessLM(pretrained=model, tokenizer=tokenizer)` object as `model`.

* `loglikelihood(context, continuation)`: minus the Monte Carlo NELBO of the continuation tokens with
  the context tokens fixed (conditioning, not scored): a lower bound on log p(continuation | context),
  estimated with `num_samples` noise levels. `is_greedy`: whether greedy iterative denoising of the
  masked continuation (`generate`, temperature 0, one token per step) reproduces it.
* `loglikelihood_rolling(text)`: minus the NELBO of the whole text, in blocks of `max_length` tokens.
* `generate_until(context, gen_kwargs)`: `model.generate` after the context, cut at the first stop string.

Works for every model with `nelbo` and `generate` (SFDLM, and the Transformer denoiser of
`hf_sfdlm.baselines`). Needs `pip install lm_eval` (the `eval` extra).
"""

from __future__ import annotations

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as error:  # pragma: no cover - exercised only without lm_eval
    raise ImportError("hf_sfdlm.lm_eval_adapter needs lm-evaluation-harness: `pip install lm_eval` "
                      "(or `pip install 'hf-sfdlm[eval]'`).") from error

from .evaluation import load_model


@register_model("sfdlm")
class SFDLMEvalHarnessLM(LM):
    """A diffusion LM seen through the harness's three request types.

    Args:
        pretrained: a model folder / Hub id, or a loaded model with `nelbo` and `generate`.
        tokenizer: a tokenizer object or path; defaults to `pretrained`'s folder.
        num_samples: noise levels t per NELBO estimate.
        batch_size: accepted for the harness's interface; requests are scored one at a time (each with
            its own seeded generator, so a score never depends on the rest of the run).
        max_length: longest sequence scored (the context is cut from the left); defaults to 512.
        steps: denoising steps for `generate_until` (defaults to the number of new tokens).
        max_gen_toks: new tokens for `generate_until` when the task does not say.
        device: where to run the model. seed: seeds the Monte Carlo noise and the sampler.
        trust_remote_code: allow running code shipped with `pretrained` (see `hf_sfdlm.remote_code`).
    """

    def __init__(self, pretrained, tokenizer=None, num_samples: int = 16, batch_size: int = 8,
                 max_length: int = 512, steps: int | None = None, max_gen_toks: int = 64,
                 device: str = "cpu", seed: int = 0, trust_remote_code: bool = False, **kwargs):
        super().__init__()
        from transformers import AutoTokenizer

        num_samples, batch_size, max_length, max_gen_toks = (int(v) for v in (num_samples, batch_size, max_length, max_gen_toks))
        for name, value in (("num_samples", num_samples), ("batch_size", batch_size), ("max_length", max_length),
                            ("max_gen_toks", max_gen_toks)):
            if value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value}.")
        model = load_model(pretrained, device=device, trust_remote_code=trust_remote_code) \
            if isinstance(pretrained, str) else pretrained
        if not callable(getattr(model, "nelbo", None)) or not callable(getattr(model, "generate", None)):
            raise TypeError(f"`pretrained` must be a diffusion LM with `nelbo` and `generate`, got {type(model).__name__}.")
        if tokenizer is None or isinstance(tokenizer, str):
            source = tokenizer or (pretrained if isinstance(pretrained, str) else None)
            if source is None:
                raise ValueError("Pass `tokenizer` when `pretrained` is a model object.")
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.num_samples, self.batch_size_per_call, self.max_length = num_samples, batch_size, max_length
        self.steps = int(steps) if steps is not None else None
        self.max_gen_toks = max_gen_toks
        self.seed = int(seed)
        self._device = next(model.parameters()).device

    # ------------------------------------------------------------------ helpers
    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # As the harness's HF models do: trailing spaces of the context belong to the continuation.
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids, continuation_ids = self.tok_encode(context), self.tok_encode(continuation)
        if not continuation_ids:
            raise ValueError(f"Continuation {continuation!r} has no tokens to score.")
        if len(continuation_ids) > self.max_length:
            raise ValueError(f"Continuation of {len(continuation_ids)} tokens exceeds max_length={self.max_length}.")
        keep = self.max_length - len(continuation_ids)
        return (context_ids[-keep:] if keep else []), continuation_ids

    def _scores(self, rows: list[tuple[list[int], list[int]]]) -> list[float]:
        """Minus the conditional NELBO of each continuation. Each request gets its own generator seeded
        with `seed`, so its score does not depend on the other requests of the run (the harness caches
        and compares scores per request)."""
        out = []
        for context, continuation in rows:
            ids = torch.tensor([context + continuation], device=self._device)
            labels = torch.tensor([[-100] * len(context) + continuation], device=self._device)
            nelbo = self.model.nelbo(ids, labels=labels, num_samples=self.num_samples, generator=self._generator())
            out.append(-float(nelbo[0]))
        return out

    def _greedy_matches(self, context: list[int], continuation: list[int]) -> bool:
        mask_id = getattr(self.model.config, "mask_token_id", None)
        if mask_id is None:
            return False
        ids = torch.tensor([context + [mask_id] * len(continuation)], device=self._device)
        out = self.model.generate(ids, steps=len(continuation), temperature=0.0, generator=self._generator())
        return out[0, len(context):len(context) + len(continuation)].tolist() == continuation

    # ------------------------------------------------------------------ the harness API
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        rows = [self._split(*request.args) for request in requests]
        scores = self._scores(rows)
        results = []
        for request, row, score in zip(requests, rows, scores):
            result = (score, self._greedy_matches(*row))
            self.cache_hook.add_partial("loglikelihood", request.args, result)
            results.append(result)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        results = []
        for request in requests:
            (text,) = request.args[:1]
            ids = self.tok_encode(text)
            blocks = [([], ids[i:i + self.max_length]) for i in range(0, len(ids), self.max_length)]
            total = sum(self._scores(blocks)) if blocks else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            results.append(total)
        return results

    def generate_until(self, requests) -> list[str]:
        results = []
        for request in requests:
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            new_tokens = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(gen_kwargs.pop("do_sample", False))
            temperature = float(gen_kwargs.pop("temperature", 1.0 if do_sample else 0.0))
            context_ids = self.tok_encode(context)[-max(1, self.max_length - new_tokens):]
            ids = torch.tensor([context_ids], device=self._device, dtype=torch.long)
            out = self.model.generate(ids if context_ids else None, max_new_tokens=new_tokens,
                                      steps=self.steps or new_tokens, temperature=temperature if do_sample else 0.0,
                                      generator=self._generator())
            text = self.tokenizer.decode(out[0, len(context_ids):].tolist(), skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            self.cache_hook.add_partial("generate_until", request.args, text)
            results.append(text)
        return results


__all__ = ["SFDLMEvalHarnessLM"]
