"""`python -m uccl_jax.convert`: see uccl_jax/convert/command_line.py for the usage."""

import sys

from uccl_jax.convert.command_line import main

if __name__ == '__main__':
  sys.exit(main())
