"""`evaluate` metric: NELBO perplexity of texts under an SFDLM (or baseline) model.

Loads offline from its local folder:

    import evaluate
    metric = evaluate.load("path/to/hf_sfdlm/metrics/sfdlm_perplexity")
    metric.compute(predictions=["some text", "more text"], model_id="path/to/model", num_samples=16)

The texts are joined as lines of one document and scored in blocks of `block_size` tokens
(see `hf_sfdlm.evaluation.evaluate_perplexity`). Diffusion models give a Monte Carlo NELBO (an upper
bound on the NLL) with its standard error; autoregressive models give the exact NLL.
"""

import datasets
import evaluate

from hf_sfdlm.evaluation import evaluate_perplexity, load_model

_DESCRIPTION = """
Perplexity of texts under a diffusion language model (SFDLM, or the MDLM-style Transformer denoiser of
hf_sfdlm.baselines) by its Monte Carlo NELBO, or under an autoregressive model exactly. Reported three
ways: token-level perplexity (under the named tokenizer), word-level perplexity (total NLL / words,
words counted as whitespace-separated words plus one end-of-line token per text: the PTB/WikiText
convention) and bits per byte, each with its Monte Carlo standard error.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): the texts to score, one line each.
    model_id (`str`): local path (or Hub id) of the model; or pass `model=` (a loaded model) instead.
    model (*optional*): an already loaded model.
    tokenizer (*optional*): a tokenizer object or path; defaults to the model's folder.
    block_size (`int`, defaults to 128): tokens per independently scored block.
    batch_size (`int`, defaults to 16).
    num_samples (`int`, defaults to 16): noise levels t per block (diffusion models).
    seed (`int`, defaults to 0).
    device (`str`, *optional*): where to run the model.
Returns:
    `token_perplexity`, `word_perplexity`, `bits_per_byte`, `nll_per_token` and their `*_stderr`,
    `num_tokens`, `num_words`, `num_bytes`, `num_samples`, `estimator` ("nelbo" or "exact"), `tokenizer`.
Examples:
    >>> metric = evaluate.load("hf_sfdlm/metrics/sfdlm_perplexity")
    >>> metric.compute(predictions=["the cat sat"], model_id="my-sfdlm")["word_perplexity"]  # doctest: +SKIP
"""

_CITATION = """
@article{sfdlm2025, title={State Fourier Diffusion Language Model}, journal={arXiv:2503.17382}, year={2025}}
@inproceedings{sahoo2024mdlm, title={Simple and Effective Masked Diffusion Language Models}, booktitle={NeurIPS}, year={2024}}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SfdlmPerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
            reference_urls=["https://arxiv.org/abs/2503.17382", "https://arxiv.org/abs/2406.07524"],
        )

    def _compute(self, predictions, model_id=None, model=None, tokenizer=None, block_size=128, batch_size=16,
                 num_samples=16, seed=0, device=None):
        from transformers import AutoTokenizer

        if model is None and model_id is None:
            raise ValueError("Pass `model_id` (a model folder or Hub id) or `model` (a loaded model).")
        if not predictions or not all(isinstance(text, str) for text in predictions):
            raise ValueError("`predictions` must be a non-empty list of strings.")
        if model is None:
            model = load_model(model_id, device=device)
        if tokenizer is None or isinstance(tokenizer, str):
            source = tokenizer or model_id or getattr(model, "name_or_path", None)
            if not source:
                raise ValueError("Pass `tokenizer` (an object or a path): the model has no folder to load one from.")
            tokenizer = AutoTokenizer.from_pretrained(source)
        text = "".join(line + "\n" for line in predictions)
        result = evaluate_perplexity(model, tokenizer, text, block_size=block_size, batch_size=batch_size,
                                     num_samples=num_samples, seed=seed)
        return result.to_dict()
