import sys

from asymret.api.cli import main

sys.exit(main())
