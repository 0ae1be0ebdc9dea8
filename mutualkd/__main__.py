import sys

from mutualkd.cli import main

sys.exit(main())
