"""`python -m ctscan` (and `torchrun -m ctscan`) runs the CLI."""

from ctscan.cli import main

if __name__ == "__main__":
    main()
