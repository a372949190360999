import sys

from lorafx.cli import main

sys.exit(main())
