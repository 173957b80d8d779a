"""The ``dynvm`` command line (entry point :func:`provisioner.cli.main.main`)."""
