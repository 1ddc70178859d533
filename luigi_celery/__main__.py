import sys

from luigi_celery.cli import main

sys.exit(main())
