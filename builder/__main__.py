"""python -m builder: the same as the `builder` command."""

import sys

try:
    from builder.cli import main
except ModuleNotFoundError as error:  # `python` is not the environment the README installs
    from builder.console import missing_package

    verb = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), "")
    print(missing_package(verb, error), file=sys.stderr)
    sys.exit(2)

sys.exit(main())
