"""`sfdlm train`: train an SFDLM with accelerate (also `training/train.py` and `accelerate launch`).

With no arguments it runs the embedded default: the `tiny` preset on the synthetic grammar corpus, on CPU
in a few minutes. It then reports the held-out NELBO per token against the corpus's exact entropy rate,
saves the model, tokenizer and generation config, and prints samples and an infilling example from the
saved model. `--data FILE_OR_DATASET` replaces the corpus (a byte-level BPE is trained on it unless
`--tokenizer` names one).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML preset, e.g. training/configs/small.yaml (default: the tiny preset, "
                                         "training/configs/tiny.yaml)")
    parser.add_argument("--data", help="text/JSON lines/CSV/Parquet file or folder, or a Hub dataset name, replacing "
                                       "the synthetic corpus (sets data.dataset; default: the synthetic corpus)")
    parser.add_argument("--text-column", help="column holding the text (sets data.text_column; default: text)")
    parser.add_argument("--tokenizer", help="AutoTokenizer name or folder (default: word-level for the synthetic "
                                            "corpus, otherwise a byte-level BPE trained on the data)")
    parser.add_argument("--output-dir", help="where the model, checkpoints and logs go (sets training.output_dir; "
                                             "default: the preset's, outputs/sfdlm-tiny, or outputs/sfdlm-<data name> "
                                             "with --data)")
    parser.add_argument("--max-steps", type=int,
                        help="optimizer steps (sets training.max_steps; default: the preset's, 500 for tiny)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in <output-dir> from its newest usable checkpoint (a finished run "
                             "is left as it is)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the checkpoints and logs of an earlier run in <output-dir> and start afresh "
                             "(default: refuse to touch a used folder)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU intra-op threads (sets training.cpu_threads; default: the preset's, 1 for tiny)")
    parser.add_argument("--num-samples", type=int, default=3,
                        help="samples printed after training, 0 for none (default: 3)")
    parser.add_argument("--sample-steps", type=int, default=32,
                        help="denoising steps of the printed samples (default: 32)")
    parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE",
                        help="config overrides anywhere on the command line, e.g. training.learning_rate=1e-3 "
                             "model.process=uniform")


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="Train an SFDLM (default: tiny preset on the synthetic corpus).",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    from ..train_config import load_config

    overrides = list(args.overrides or [])
    if args.data is not None and args.output_dir is None and \
            not any(item.startswith("training.output_dir=") for item in overrides):
        from ._common import slug

        # Other data, another model: never the tiny preset's folder.
        overrides.insert(0, f"training.output_dir=outputs/sfdlm-{slug(args.data)}")
    for flag, key in (("data", "data.dataset"), ("text_column", "data.text_column"),
                      ("output_dir", "training.output_dir"), ("max_steps", "training.max_steps"),
                      ("threads", "training.cpu_threads")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    config = load_config(args.config, overrides)
    if args.tokenizer is not None:
        config.tokenizer = args.tokenizer
    return config


def warn_if_mpi_launch_without_mpi() -> bool:
    """`accelerate launch --cpu --num_processes N` (N > 1) without MPI starts ONE process; it sets MASTER_ADDR
    for the processes it did not start. Say so, with the launch that works (returns whether it warned)."""
    import os

    env = os.environ
    launched_alone = (env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in env
                      and not any(k in env for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_SIZE")))
    if launched_alone:
        print("WARNING: `accelerate launch --cpu --num_processes N` needs MPI (mpirun) to start N processes; without "
              "it this is a single process (same global batch, so the same result, only slower). For N CPU "
              "processes with gloo use `accelerate launch --multi_gpu --num_processes N` on a machine without "
              "GPUs, `--config_file training/accelerate_configs/cpu.yaml`, or `torchrun --nproc_per_node N`.",
              file=sys.stderr)
    return launched_alone


def run(args: argparse.Namespace) -> int:
    from ..pipelines import run_training

    warn_if_mpi_launch_without_mpi()
    if args.num_samples < 0 or args.sample_steps < 1:
        raise ValueError(f"--num-samples must be 0 or more and --sample-steps positive, got {args.num_samples} "
                         f"and {args.sample_steps}.")
    config = config_from_args(args)
    from ._common import quiet_expected_warnings

    quiet_expected_warnings()
    result, trainer = run_training(config, resume=args.resume, overwrite=args.overwrite,
                                   callbacks=[model_card_callback(config)])
    if result.already_finished:
        return 0  # the trainer said so; card, report and model stay as they are
    if trainer.accelerator.is_main_process:
        report = entropy_report(config, result)
        print_report(report)
        (Path(config.training.output_dir) / "train_report.json").write_text(json.dumps(report, indent=1))
        if args.num_samples > 0:
            print_samples(config, args.num_samples, args.sample_steps)
    return 0


def model_card_callback(config):
    """Writes a model card (held-out NELBO, examples from held-out text, NELBO / entropy rate on the
    synthetic corpus) into every folder the run saves."""
    from ..model_card import ModelCardCallback, is_hub_dataset

    data = config.data
    entropy_rate = None
    if data.is_synthetic:
        from ..synthetic import SyntheticGrammar

        name, kind = "hf_sfdlm synthetic grammar", "synthetic-grammar"
        description = (f"hf_sfdlm synthetic grammar corpus ({data.synthetic_sentences:,} sentences, seed "
                       f"{data.synthetic_seed}; `hf_sfdlm.synthetic`), exact entropy rate known")
        tokenizer = "word-level (hf_sfdlm.synthetic.word_level_tokenizer)"
        entropy_rate = SyntheticGrammar().entropy_rate()
    else:
        hub = is_hub_dataset(data.dataset)
        name, kind = data.dataset if hub else Path(data.dataset).name, None
        description = (f"{data.dataset}" + (f" ({data.dataset_config})" if data.dataset_config else "")
                       if hub else f"a local file or folder, {Path(data.dataset).name} (not on the Hub)")
        tokenizer = config.tokenizer or f"byte-level BPE trained on the data ({config.tokenizer_vocab_size} tokens)"
    info = {"method": "pretraining from scratch (diffusion NELBO)", "data": description,
            "block_size": data.block_size, "packing": data.packing}
    return ModelCardCallback(name, training_info=info, tokenizer_name=tokenizer, dataset_type=kind,
                             entropy_rate=entropy_rate, datasets=None if data.is_synthetic else [data.dataset])


def entropy_report(config, result) -> dict:
    """The run's figures; for the synthetic corpus also its entropy rate and the NELBO / entropy ratio."""
    report = {"steps": result.step, "tokens": result.tokens, "seconds": round(result.seconds, 1),
              "train_loss": result.train_loss, "eval_nelbo": result.eval_nelbo,
              "best_eval_nelbo": result.best_eval_nelbo, "best_step": result.best_step,
              "output_dir": str(result.output_dir), "process": config.model.get("process"),
              "block_size": config.data.block_size}
    if config.data.is_synthetic and result.eval_nelbo is not None:
        from ..synthetic import SyntheticGrammar

        grammar = SyntheticGrammar()
        rate = grammar.entropy_rate()
        report.update({
            "entropy_rate": rate,
            # A block cut from the stream does not reveal its first state: its best possible NLL per token
            # lies between h and h + H(S_1) / block_size.
            "entropy_per_token_upper": rate + grammar.stationary_state_entropy() / config.data.block_size,
            "nelbo_over_entropy": result.eval_nelbo / rate,
        })
    return report


def print_report(report: dict) -> None:
    print(f"\nTrained {report['steps']} steps ({report['tokens']:,} tokens) in {report['seconds']:.0f} s; "
          f"model saved to {report['output_dir']}")
    if report["eval_nelbo"] is None:
        return
    nelbo = report["eval_nelbo"]
    print(f"Held-out NELBO: {nelbo:.4f} nats/token (perplexity <= {math.exp(nelbo):.2f})")
    if "entropy_rate" in report:
        print(f"Source entropy rate: {report['entropy_rate']:.4f} nats/token (the best achievable on "
              f"{report['block_size']}-token blocks lies in [{report['entropy_rate']:.4f}, "
              f"{report['entropy_per_token_upper']:.4f}])")
        print(f"NELBO / entropy rate: {report['nelbo_over_entropy']:.3f}")


def print_samples(config, num_samples: int, steps: int) -> None:
    """Unconditional samples and an infilling example (a held-out line, the one on the model card) from
    the model saved in `output_dir`; special tokens are never printed and samples stop at EOS."""
    import torch
    from transformers import AutoTokenizer

    from .. import SFDLMForDiffusionLM  # also registers the Auto classes the tokenizer's loader needs
    from ..model_card import read_card_record
    from ..streaming import decode_visible

    out = Path(config.training.output_dir)
    model = SFDLMForDiffusionLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    generator = torch.Generator().manual_seed(config.training.seed)
    length = min(config.data.block_size, 32)
    with torch.no_grad():
        samples = model.generate(None, max_new_tokens=length, steps=steps, num_return_sequences=num_samples,
                                 generator=generator)
    eos = tokenizer.eos_token_id
    print(f"\nSamples ({length} tokens, {steps} denoising steps, up to the first {tokenizer.eos_token}):")
    for row in samples.tolist():
        print("  " + decode_visible(tokenizer, row[:row.index(eos)] if eos in row else row))

    example = read_card_record(out).get("examples") or {}
    if not example.get("before") or tokenizer.mask_token is None or getattr(model.config, "block_size", None):
        return  # (block-diffusion models generate after a prompt and do not infill)
    text = example["before"] + tokenizer.mask_token * example["masked_tokens"] + example["after"]
    masked = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        filled = model.generate(masked, steps=max(1, min(steps, example["masked_tokens"])), generator=generator)
    print(f"\nInfilling a held-out line ({example['masked_tokens']} tokens masked and regenerated):")
    print("  original: " + example["line"])
    print("  masked:   " + decode_visible(tokenizer, masked[0].tolist()))
    print("  filled:   " + decode_visible(tokenizer, filled[0].tolist()))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `training/train.py`: `sfdlm train`, with the same options and error reporting."""
    from ..cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
