import sys

from vlmpress.cli import main

sys.exit(main())
