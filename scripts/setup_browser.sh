#!/usr/bin/env bash
# The page test (tests/test_page.py) drives Debian's Chromium through Playwright (Playwright's own browser
# download cannot work offline). Installs the `chromium` package when missing; needs root and apt. Without
# root it says so and goes on: the page test then skips, except under CI=true, where it fails.
set -euo pipefail
command -v chromium >/dev/null && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "setup_browser.sh: the page test needs Debian's chromium (apt-get install chromium, as root)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
echo "setup_browser.sh: installed $(chromium --version 2>/dev/null | head -1)"
