import sys

from soupkit.cli import main

sys.exit(main())
