"""Cached block generation for block-diffusion SFDLM models (`config.block_size`).

This file is "remote code": it imports only torch, transformers and its sibling files.
"""

from __future__ import annotations
