"""Subcommands of the `xlkernels` CLI (see xlkernels/cli.py)."""
