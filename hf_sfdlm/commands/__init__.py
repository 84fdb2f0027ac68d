"""Subcommands of the `sfdlm` command line, one module each (see `hf_sfdlm.cli`)."""
