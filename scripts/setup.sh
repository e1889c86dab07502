#!/usr/bin/env bash
# Creates .venv and installs the project with its dev and geneval extras; a no-op when pyproject.toml and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

# Debian's headless chromium, a system package: the run report's browser test (tests/test_run_report.py) opens the
# page in it. Checked on every call, before the stamp: a fresh machine may reuse a .venv but not /usr/bin.
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium (Debian package) for the run report's browser test" >&2
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; } \
      || echo "setup: installing chromium failed; the run report's browser test will be skipped" >&2
  else
    echo "setup: /usr/bin/chromium is missing and installing it needs root and apt-get, so the run report's" \
      "browser test will be skipped; as root: apt-get install -y --no-install-recommends chromium" >&2
  fi
fi

stamp=.venv/.installed-$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ]; then exit 0; fi
echo "setting up .venv (first run: torch and friends, a few minutes)" >&2
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch first, pinned: the CUDA build serves CPU too; other packages must not pull another torch.
.venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q -e ".[dev,geneval]"
rm -f .venv/.installed-*
touch "$stamp"
