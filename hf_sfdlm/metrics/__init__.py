"""`evaluate` metric modules shipped with hf_sfdlm, loadable offline from their folders:

    import evaluate
    from hf_sfdlm.metrics import SFDLM_PERPLEXITY_PATH
    metric = evaluate.load(SFDLM_PERPLEXITY_PATH)
"""

import os

SFDLM_PERPLEXITY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sfdlm_perplexity")

__all__ = ["SFDLM_PERPLEXITY_PATH"]
