"""`python -m dsopt` runs the command-line interface."""

from dsopt.cli import main

raise SystemExit(main())
