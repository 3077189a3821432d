"""`python -m sparsebench` is the same as the `sparsebench` command."""

from .cli import main

main()
