import sys

from para_train.cli import main

sys.exit(main())
