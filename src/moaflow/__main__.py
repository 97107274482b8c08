import sys

from moaflow.cli import main

sys.exit(main())
