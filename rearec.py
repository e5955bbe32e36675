"""Placeholder: rearec.py lands with its own issue."""
import sys


def main(argv=None):
    sys.exit("rearec.py: not implemented yet")


if __name__ == "__main__":
    main()
