"""`python -m serving.control_plane [--host H] [--port P]`: run the control-plane API.

Settings come from the environment (`MLOPS_*`); host and port default to those of `MLOPS_CONTROL_PLANE_URL`.
"""

from __future__ import annotations

import argparse
import sys
from urllib.parse import urlsplit

from mlops.settings import SettingsError, load_settings


def _parse_args(argv: list[str] | None, default_url: str) -> argparse.Namespace:
    url = urlsplit(default_url)
    parser = argparse.ArgumentParser(prog="python -m serving.control_plane", description=__doc__)
    parser.add_argument("--host", default=url.hostname or "127.0.0.1", help="interface to bind")
    parser.add_argument("--port", type=int, default=url.port or 8700, help="TCP port to bind")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings()
    except SettingsError as error:
        print(error, file=sys.stderr)
        return 2
    args = _parse_args(argv, settings.control_plane_url)
    from serving.control_plane.app import serve  # after settings: a typo should not wait for heavy imports

    serve(settings, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
