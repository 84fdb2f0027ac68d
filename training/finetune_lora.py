#!/usr/bin/env python
"""LoRA fine-tuning of an SFDLM with accelerate: domain text or instruction (SFT) JSON lines.

    accelerate launch training/finetune_lora.py --model org/sfdlm-small --data my.jsonl [training.key=value ...]
    python training/finetune_lora.py --model outputs/sfdlm-tiny --data notes.txt --max-steps 200

Every option of `sfdlm finetune` works here (`--help`). The loop, checkpoints (`--resume`) and logs are those
of `hf_sfdlm.trainer.DiffusionTrainer`; the adapter, tokenizer and model card land in `--output-dir`.
"""

import sys
from pathlib import Path

try:
    import hf_sfdlm  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_sfdlm.commands.finetune import main

if __name__ == "__main__":
    sys.exit(main())
