"""`python -m nefgpt` is the `nefgpt` command."""

import sys

from .cli import main

sys.exit(main())
