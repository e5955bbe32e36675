"""Placeholder: stream_rec.py lands with its own issue."""
import sys


def main(argv=None):
    sys.exit("stream_rec.py: not implemented yet")


if __name__ == "__main__":
    main()
