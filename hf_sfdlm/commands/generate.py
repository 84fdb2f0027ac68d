"""`sfdlm generate` and `sfdlm infill`: sample from a saved SFDLM model with a live view of the canvas.

    sfdlm generate --model PATH_OR_HUB_ID --prompt "the small dog" --steps 32 [--sampler confidence]
    sfdlm infill --model PATH_OR_HUB_ID --text "the [MASK] dog sees a [MASK] ball ."

Both load the model and its tokenizer from the same place, build an `SFDLMGenerationConfig` from the flags
(unset flags keep the checkpoint's `generation_config.json`), and stream every draft to a
`CanvasStreamer`: redrawn in place with a progress meter on a terminal, final text only elsewhere.
"""

from __future__ import annotations

import argparse

__all__ = ["register"]


# The samplers hf_sfdlm ships (`hf_sfdlm.generation_sfdlm.SAMPLERS`; tests keep the two in step). Listed
# here so `--help` and a mistyped --model do not wait for torch; plug-in samplers are accepted too.
BUILTIN_SAMPLERS = ("ancestral", "confidence", "euler", "threshold", "tweedie", "uniform")
CONFIDENCE_MEASURES = ("max_prob", "margin", "entropy")


def register(subparsers) -> None:
    """Add the `generate` and `infill` subcommands."""
    from ._common import add_threads_argument
    from ..remote_code import TRUST_REMOTE_CODE_HELP

    generate = subparsers.add_parser(
        "generate", help="continue a prompt by iterative denoising",
        description="Generate text after a prompt (or unconditionally) by iterative denoising.")
    generate.add_argument("--prompt", default="", help="text to continue (default: empty, unconditional)")
    generate.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    generate.set_defaults(func=run_generate)

    infill = subparsers.add_parser(
        "infill", help="fill the [MASK]s of a text",
        description="Fill every mask placeholder of a text; the rest of the text stays fixed.")
    infill.add_argument("--text", required=True, help='text with placeholders, e.g. "The [MASK] sat on the [MASK]."')
    infill.add_argument("--mask-string", default=None,
                        help="placeholder in --text (default: the tokenizer's mask token, else [MASK])")
    infill.add_argument("--max-new-tokens", type=int, default=0, help="tokens to append after the text (default: 0)")
    infill.set_defaults(func=run_infill)

    for parser in (generate, infill):
        parser.add_argument("--model", required=True, help="local folder or Hub id (org/name) of an SFDLM checkpoint")
        parser.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: --model)")
        parser.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
        parser.add_argument("--steps", type=int, default=None,
                            help="denoising steps (default: `steps` of the model's generation_config.json, else 64)")
        parser.add_argument("--sampler", default=None, metavar="NAME",
                            help=f"reverse-chain sampler, one of {', '.join(BUILTIN_SAMPLERS)} (default: ancestral "
                                 "for absorbing models, uniform for uniform ones)")
        parser.add_argument("--temperature", type=float, default=None,
                            help="softmax temperature of the denoiser's predictions; 0 = greedy (default: 1.0)")
        parser.add_argument("--top-k", type=int, default=None,
                            help="sample only among the k most likely tokens; 0 = all (default: 0)")
        parser.add_argument("--top-p", type=float, default=None,
                            help="nucleus sampling: the smallest token set with this much probability (default: 1.0)")
        parser.add_argument("--confidence-measure", choices=CONFIDENCE_MEASURES, default=None,
                            help="how --sampler confidence/threshold rank positions to unmask (default: max_prob)")
        parser.add_argument("--confidence-threshold", type=float, default=None,
                            help="--sampler threshold: unmask every position at least this confident (default: 0.9)")
        parser.add_argument("--block-length", type=int, default=None,
                            help="semi-autoregressive blocks of this many tokens (default: the whole canvas at once)")
        parser.add_argument("--num-return-sequences", type=int, default=None,
                            help="independent samples to draw (default: 1)")
        parser.add_argument("--seed", type=int, default=0, help="random seed of the sampler (default: 0)")
        parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cuda if "
                                                           "available, else cpu)")
        add_threads_argument(parser)
        parser.add_argument("--no-live", action="store_true",
                            help="print only the final text (default: redraw the canvas live on a terminal)")
        parser.add_argument("--sleep", type=float, default=None,
                            help="pause after each draft, in seconds, to slow a demo down (default: none)")


def check_numbers(args: argparse.Namespace) -> None:
    """Numeric flags checked before anything is loaded."""
    for name, minimum in (("steps", 1), ("top_k", 0), ("num_return_sequences", 1), ("block_length", 1)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}.")
    for name, low, high in (("top_p", 0.0, 1.0), ("confidence_threshold", 0.0, 1.0)):
        value = getattr(args, name)
        if value is not None and not low < value <= high:
            raise ValueError(f"--{name.replace('_', '-')} must be in ({low}, {high}], got {value}.")
    if args.temperature is not None and args.temperature < 0:
        raise ValueError(f"--temperature must be 0 (greedy) or more, got {args.temperature}.")
    from ._common import check_seed

    check_seed(args.seed)


def _load(args: argparse.Namespace):
    from ._common import check_model_location

    check_numbers(args)

    model_path = check_model_location(args.model)
    tokenizer_path = check_model_location(args.tokenizer, "--tokenizer", bare_ids=True) if args.tokenizer else model_path
    if args.sampler is not None:
        from ..generation_sfdlm import SAMPLERS

        if args.sampler not in SAMPLERS:
            raise ValueError(f"--sampler {args.sampler!r} is not one of {', '.join(sorted(SAMPLERS))}.")
    import torch

    from ..hub import load_pretrained, load_tokenizer
    from ._common import check_device, quiet_expected_warnings, set_cpu_threads

    quiet_expected_warnings()
    set_cpu_threads(args.threads)
    device = check_device(args.device) or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pretrained(model_path, trust_remote_code=args.trust_remote_code).to(device).eval()
    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=args.trust_remote_code)
    return model, tokenizer


def _generation_config(args: argparse.Namespace, model, **extra):
    from ..generation_sfdlm import SFDLMGenerationConfig

    flags = dict(steps=args.steps, sampler=args.sampler, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p, confidence_measure=args.confidence_measure,
                 confidence_threshold=args.confidence_threshold, block_length=args.block_length,
                 num_return_sequences=args.num_return_sequences, max_new_tokens=args.max_new_tokens, **extra)
    config = SFDLMGenerationConfig(**{name: value for name, value in flags.items() if value is not None})
    steps = config.steps or getattr(model.generation_config, "steps", None) or \
        SFDLMGenerationConfig._get_default_generation_params()["steps"]
    return config, steps


def _run(args: argparse.Namespace, model, tokenizer, input_ids, **extra) -> int:
    import torch

    from ..streaming import CanvasStreamer

    config, steps = _generation_config(args, model, **extra)
    streamer = CanvasStreamer(tokenizer, total_steps=steps, live=False if args.no_live else None, sleep=args.sleep)
    generator = torch.Generator().manual_seed(args.seed)
    model.generate(input_ids, generation_config=config, streamer=streamer, generator=generator)
    return 0


def run_generate(args: argparse.Namespace) -> int:
    """`sfdlm generate`."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}.")
    model, tokenizer = _load(args)
    import torch

    from ._common import warn_unknown_words

    warn_unknown_words(tokenizer, args.prompt)
    ids = tokenizer(args.prompt, add_special_tokens=False)["input_ids"] if args.prompt else []
    input_ids = torch.tensor([ids], device=model.device) if ids else None
    return _run(args, model, tokenizer, input_ids)


def encode_with_masks(tokenizer, text: str, mask_string: str, mask_token_id: int) -> list[int]:
    """Token ids of `text` with every `mask_string` replaced by one `mask_token_id`: the pieces between the
    placeholders are encoded on their own, so the placeholder needs no spaces around it."""
    pieces = text.split(mask_string)
    ids: list[int] = []
    for index, piece in enumerate(pieces):
        last = index == len(pieces) - 1
        piece = piece if last else piece.rstrip()  # the space before a mask belongs to the filled token
        if piece.strip():
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
        if not last:
            ids.append(mask_token_id)
    return ids


def run_infill(args: argparse.Namespace) -> int:
    """`sfdlm infill`."""
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be 0 or more, got {args.max_new_tokens}.")
    model, tokenizer = _load(args)
    import torch

    mask_id = model.config.mask_token_id
    if mask_id is None:
        mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is None:
        raise ValueError("neither the model nor its tokenizer defines a mask token, so the "
                         "placeholders cannot be filled (a uniform model needs `mask_token_id` in its config "
                         "or a tokenizer with a mask token).")
    mask_string = args.mask_string or getattr(tokenizer, "mask_token", None) or "[MASK]"
    if mask_string not in args.text:
        raise ValueError(f"--text contains no {mask_string!r} placeholder to fill.")
    from ._common import warn_unknown_words

    warn_unknown_words(tokenizer, " ".join(args.text.split(mask_string)), "--text")
    ids = encode_with_masks(tokenizer, args.text, mask_string, mask_id)
    input_ids = torch.tensor([ids], device=model.device)
    return _run(args, model, tokenizer, input_ids, mask_token_id=mask_id)
