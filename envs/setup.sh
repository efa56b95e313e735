#!/usr/bin/env bash
# Create (or update) .venv from the exact pins in envs/requirements.txt.
# Idempotent: a stamp holding the lock file's hash skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
lock=envs/requirements.txt
want=$(sha256sum "$lock" | cut -d' ' -f1)
stamp=.venv/.advrepro-lock
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python=${PYTHON:-python3}
"$python" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"advrepro pins Python 3.11, found {sys.version.split()[0]}: set PYTHON=/path/to/python3.11"'
echo "advrepro: installing the pinned environment into .venv (one time, a few minutes)" >&2
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -qq --disable-pip-version-check -r "$lock"  # errors still shown
echo "$want" > "$stamp"
