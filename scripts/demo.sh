#!/usr/bin/env bash
# Sets up .venv, then starts an edge server on 127.0.0.1, runs a device client against it and
# prints the streamed answer and the statistics, then stops the server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
