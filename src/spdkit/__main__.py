"""`python -m spdkit`: the command line (what torchrun starts on every rank)."""

from spdkit.cli import main

main()
