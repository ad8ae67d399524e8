import sys

from colo_agent.cli import main

sys.exit(main())
