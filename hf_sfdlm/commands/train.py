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
    parser.add_argument("--config", help="YAML preset, e.g. training/configs/small.yaml (default: the tiny preset).")
    parser.add_argument("--data", help="Text/JSON lines/CSV/Parquet file or folder, or a Hub dataset name, "
                                       "replacing the synthetic corpus (sets data.dataset).")
    parser.add_argument("--text-column", help="Column holding the text (sets data.text_column).")
    parser.add_argument("--tokenizer", help="AutoTokenizer name or folder (default: word-level for the synthetic "
                                            "corpus, otherwise a byte-level BPE trained on the data).")
    parser.add_argument("--output-dir", help="Where the model, checkpoints and logs go (sets training.output_dir).")
    parser.add_argument("--max-steps", type=int, help="Optimizer steps (sets training.max_steps).")
    parser.add_argument("--resume", action="store_true",
                        help="Continue the run in <output-dir> from its newest usable checkpoint.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Delete the checkpoints and logs of the run in <output-dir> and start afresh.")
    parser.add_argument("--num-samples", type=int, default=3, help="Samples printed after training (0: none).")
    parser.add_argument("--sample-steps", type=int, default=32, help="Denoising steps of the printed samples.")
    parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE",
                        help="Config overrides, e.g. training.learning_rate=1e-3 model.process=uniform.")


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="Train an SFDLM (default: tiny preset on the synthetic corpus).",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    from ..train_config import load_config

    overrides = list(args.overrides)
    for flag, key in (("data", "data.dataset"), ("text_column", "data.text_column"),
                      ("output_dir", "training.output_dir"), ("max_steps", "training.max_steps")):
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
    config = config_from_args(args)
    result, trainer = run_training(config, resume=args.resume, overwrite=args.overwrite,
                                   callbacks=[model_card_callback(config)])
    if trainer.accelerator.is_main_process:
        report = entropy_report(config, result)
        print_report(report)
        (Path(config.training.output_dir) / "train_report.json").write_text(json.dumps(report, indent=1))
        if args.num_samples > 0:
            print_samples(config, args.num_samples, args.sample_steps)
    return 0


def model_card_callback(config):
    """Writes a model card (with the latest held-out NELBO) into every folder the run saves."""
    from ..model_card import ModelCardCallback

    data = config.data
    if data.is_synthetic:
        name = f"hf_sfdlm synthetic grammar corpus ({data.synthetic_sentences} sentences, seed {data.synthetic_seed})"
        tokenizer = "word-level (hf_sfdlm.synthetic.word_level_tokenizer)"
    else:
        name = data.dataset if data.dataset_config is None else f"{data.dataset} ({data.dataset_config})"
        tokenizer = config.tokenizer or f"byte-level BPE trained on the data ({config.tokenizer_vocab_size} tokens)"
    info = {"method": "pretraining from scratch (diffusion NELBO)", "block_size": data.block_size,
            "packing": data.packing}
    return ModelCardCallback(name, training_info=info, tokenizer_name=tokenizer,
                             datasets=None if data.is_synthetic else [data.dataset])


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
    """Unconditional samples and an infilling example from the model saved in `output_dir`."""
    import torch
    from transformers import AutoTokenizer

    from ..modeling_sfdlm import SFDLMForDiffusionLM

    out = Path(config.training.output_dir)
    model = SFDLMForDiffusionLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    generator = torch.Generator().manual_seed(config.training.seed)
    length = min(config.data.block_size, 32)
    with torch.no_grad():
        samples = model.generate(None, max_new_tokens=length, steps=steps, num_return_sequences=num_samples,
                                 generator=generator)
    print(f"\nSamples ({length} tokens, {steps} denoising steps):")
    for row in samples:
        print("  " + tokenizer.decode(row, skip_special_tokens=False))

    text = _infill_source(config, tokenizer)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    width = ids.shape[1]
    start, stop = width // 3, width // 3 + max(1, width // 3)
    masked = ids.clone()
    masked[:, start:stop] = tokenizer.mask_token_id
    with torch.no_grad():
        filled = model.generate(masked, steps=max(1, min(steps, stop - start)), generator=generator)
    print("\nInfilling (the middle third is masked and regenerated):")
    print("  original: " + tokenizer.decode(ids[0]))
    print("  masked:   " + tokenizer.decode(masked[0]))
    print("  filled:   " + tokenizer.decode(filled[0]))


def _infill_source(config, tokenizer) -> str:
    if config.data.is_synthetic:
        from ..synthetic import SyntheticGrammar

        return " ".join(SyntheticGrammar().sample_sentences(2, generator=config.training.seed + 1))
    return "The quick brown fox jumps over the lazy dog near the river bank."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
