"""Subcommands of the `tpext` command line (tpext/cli.py): one module each, with add_arguments and run."""
