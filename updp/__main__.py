import sys

from updp.cli import main

sys.exit(main())
