import sys

from data_prep.build.cli import main

sys.exit(main())
