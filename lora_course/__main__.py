"""``python -m lora_course ...`` is the ``lora-course`` command line."""

import sys

from lora_course.recipes.cli import main

sys.exit(main())
