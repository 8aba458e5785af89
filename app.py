"""localchat's app launcher: `python app.py [flags]` is `localchat app [flags]` (see localchat/cli/app.py)."""

import sys

from localchat.cli import main

if __name__ == "__main__":
    sys.exit(main(["app", *sys.argv[1:]]))
