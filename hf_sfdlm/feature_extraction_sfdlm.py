"""transformers' `feature-extraction` pipeline for diffusion LMs: hidden states, not vocabulary logits.

`FeatureExtractionPipeline` returns the first output of `AutoModel`'s model. For BERT-like models that is
`last_hidden_state`, but an SFDLM folder's `AutoModel` is the model with its LM head (so that it can
generate, as Dream's and LLaDA's remote code do), whose first output is the logits. `save_pretrained`
therefore names this class in `config.custom_pipelines["feature-extraction"]`, transformers' own mechanism
for a model's pipeline, and it runs the backbone (`model.base_model`) instead:

    extractor = pipeline("feature-extraction", model=folder, trust_remote_code=True)
    features = extractor("some text", return_tensors=True)   # (1, length, hidden_size)

transformers asks for `trust_remote_code=True` for any pipeline a folder names, even with hf_sfdlm
installed; there, `pipeline(..., pipeline_class=hf_sfdlm.SFDLMFeatureExtractionPipeline)` runs no code
from the folder.

The noise level the backbone is conditioned on: `timesteps` if given (`extractor(text, timesteps=0.3)`);
otherwise the text is read as x_t, so an absorbing model's t comes from its masked fraction
(`infer_timesteps`; 0 for text without mask tokens) and a uniform model's t is 0 (its input is taken as
clean: corrupted tokens cannot be told apart).

This file is "remote code": it imports only torch and transformers (`modeling_sfdlm` names it, so it is
copied next to the weights).
"""

from __future__ import annotations

from transformers import FeatureExtractionPipeline
from transformers.modeling_outputs import BaseModelOutput


class SFDLMFeatureExtractionPipeline(FeatureExtractionPipeline):
    """`FeatureExtractionPipeline` whose features are the backbone's `last_hidden_state` (B, L, H) (after the
    final norm) rather than the LM head's logits. Takes `timesteps` (a float or a (batch,) tensor in [0, 1])
    besides the usual `tokenize_kwargs`, `truncation` and `return_tensors`."""

    def _sanitize_parameters(self, truncation=None, tokenize_kwargs=None, return_tensors=None, timesteps=None,
                             **kwargs):
        preprocess, forward, postprocess = super()._sanitize_parameters(truncation, tokenize_kwargs, return_tensors,
                                                                        **kwargs)
        if timesteps is not None:
            forward = {**forward, "timesteps": timesteps}
        return preprocess, forward, postprocess

    def _forward(self, model_inputs, timesteps=None):
        model = self.model
        input_ids, attention_mask = model_inputs["input_ids"], model_inputs.get("attention_mask")
        if timesteps is None and getattr(model.config, "time_conditioning", False):
            if model.diffusion.process == "absorbing":
                timesteps = model.infer_timesteps(input_ids, attention_mask)
            else:
                timesteps = 0.0
        out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, timesteps=timesteps,
                               return_dict=True)
        return BaseModelOutput(last_hidden_state=out.last_hidden_state)


__all__ = ["SFDLMFeatureExtractionPipeline"]
