#!/usr/bin/env python
"""Train an SFDLM with accelerate.

    accelerate launch training/train.py --config training/configs/small.yaml [section.key=value ...]
    accelerate launch --config_file training/accelerate_configs/ddp.yaml training/train.py --config ...
    python training/train.py                 # the tiny preset on the synthetic corpus (same as `sfdlm train`)

Every option of `sfdlm train` works here (`--help`).
"""

import sys
from pathlib import Path

try:
    import hf_sfdlm  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_sfdlm.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
