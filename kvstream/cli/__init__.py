"""The ``kvstream`` command line: one Typer app, one module per subcommand (see `kvstream.cli.app`)."""
