import sys

from nodekeeper.cli import main

sys.exit(main())
