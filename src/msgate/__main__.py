"""`python -m msgate`: the same CLI as the `msgate` entry point."""

from msgate.cli.app import main

main()
