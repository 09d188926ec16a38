"""`python -m app.bench`: the same as the `bench` command."""

from app.bench.cli import main

main()
