import sys

from aapo_ray.cli import main

sys.exit(main())
