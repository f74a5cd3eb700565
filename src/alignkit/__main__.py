"""`python -m alignkit` (and `accelerate launch -m alignkit ...`) runs the command line."""
from alignkit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
