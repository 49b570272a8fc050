import sys

from stacklm.cli import main

sys.exit(main())
