"""The `sfdlm_perplexity` evaluate metric (load it with `evaluate.load` on this folder)."""
