"""python -m bench: see bench/driver.py."""
import sys

from .driver import main

if __name__ == "__main__":
    sys.exit(main())
