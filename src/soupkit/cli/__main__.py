import os
import sys

# `python -m soupkit.cli` put the current directory first on sys.path. soupkit is imported by
# now; nothing else may come from the current directory (a stray matplotlib.py would run when
# a plot is drawn). An evaluator module there is still found: see `load_evaluator`.
if not sys.flags.safe_path and sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from soupkit.cli import main  # noqa: E402

sys.exit(main())
