"""`sfdlm push`: upload a saved model or LoRA adapter folder to the Hugging Face Hub in one commit."""

from __future__ import annotations

import argparse
import contextlib


def register(subparsers) -> None:
    from ..remote_code import TRUST_REMOTE_CODE_HELP

    parser = subparsers.add_parser(
        "push", help="Upload a model or adapter folder (weights, config, remote code, tokenizer, card) to the Hub.",
        description="Upload a saved SFDLM model or LoRA adapter folder to the Hub in one commit. The folder is "
                    "verified first (file integrity, the model loads and runs one forward pass, the tokenizer "
                    "loads); only its regular files are sent, never symbolic links. A model card is written into "
                    "the folder if it has none. --dry-run lists the files without any network and writes nothing.",
    )
    parser.add_argument("--model", required=True, help="Folder written by save_pretrained / save_adapter.")
    parser.add_argument("--repo-id", required=True, help="Target repository, 'org/name'.")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument("--revision", default=None, help="Branch to commit to, created if needed (default: the main branch).")
    parser.add_argument("--create-pr", action="store_true", help="Open a pull request instead of committing.")
    parser.add_argument("--commit-message", default=None, help="Commit message (default: \"Upload SFDLM model|adapter with hf_sfdlm\").")
    parser.add_argument("--token", default=None, help="Hub token (default: the one from `hf auth login`).")
    parser.add_argument("--license", default="apache-2.0", help="License id for a card written on push (default: apache-2.0).")
    parser.add_argument("--base-model", default=None,
                        help="Adapters: Hub repo id of the base model, written into the card (default: the one the "
                             "adapter records; required if that is a local path).")
    parser.add_argument("--no-card", action="store_true", help="Do not write a model card if the folder lacks one.")
    parser.add_argument("--dry-run", action="store_true",
                        help="Check everything and print the files that would be uploaded; no network, "
                             "nothing written.")
    parser.add_argument("--include", action="append", default=[], metavar="PATTERN",
                        help="also upload files matching this glob that are not known model, tokenizer or card "
                             "files (repeatable; code such as custom_generate/ and files over 100 MiB need it; "
                             "default: none)")
    parser.add_argument("--allow-unknown-files", action="store_true",
                        help="upload every other file of the folder too, except code, large files and secrets "
                             "(default: refuse and list them)")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="leave out files matching this glob (repeatable; default: only training leftovers)")
    parser.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..hub import push_model

    with hub_errors_in_one_line():
        result = push_model(args.model, args.repo_id, private=args.private or None, revision=args.revision,
                            create_pr=args.create_pr, commit_message=args.commit_message, token=args.token,
                            write_card=not args.no_card, license=args.license, dry_run=args.dry_run,
                            trust_remote_code=args.trust_remote_code, include_patterns=args.include,
                            allow_unknown_files=args.allow_unknown_files, ignore_patterns=args.exclude or None,
                            **({"base_model": args.base_model} if args.base_model else {}))
    if args.dry_run:
        for operation in result:
            print(operation.path_in_repo)
    else:
        print(getattr(result, "pr_url", None) or getattr(result, "commit_url", result))
    return 0


@contextlib.contextmanager
def hub_errors_in_one_line():
    """Report a Hub that cannot be reached (no network, DNS, proxy, timeout) or that refuses the request as
    an `OSError` naming the endpoint, which the CLI prints in one line, instead of the HTTP library's
    traceback."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    from ..cli import NETWORK_ERROR_MODULES

    try:
        yield
    except HfHubHTTPError as error:
        raise OSError(f"the Hub refused the request: {' '.join(str(error).split())}") from error
    except Exception as error:
        if type(error).__module__.split(".")[0] not in NETWORK_ERROR_MODULES:
            raise
        raise OSError(f"could not reach the Hub at {constants.ENDPOINT} ({type(error).__name__}: {error}); check "
                      "the network connection (and HF_ENDPOINT / proxy settings), or use --dry-run to check the "
                      "folder offline. Nothing was uploaded.") from error
