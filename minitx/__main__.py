"""``python -m minitx``: the same command line as the installed ``minitx``."""
from minitx.cli import main

if __name__ == "__main__":
    main(prog_name="minitx")
