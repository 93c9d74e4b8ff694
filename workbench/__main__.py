"""`python -m workbench ...` (and so `accelerate launch -m workbench ...`)."""

from workbench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
