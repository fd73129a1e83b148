"""`python -m llmconsole.console` is the same CLI as the `llmconsole` script."""

from .cli import main

main()
