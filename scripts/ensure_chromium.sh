#!/usr/bin/env bash
# The browser test drives Debian's chromium (Playwright, no browser download). Install it when we can.
set -eu
if [ -x /usr/bin/chromium ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
  echo "The browser test needs /usr/bin/chromium: run 'sudo apt-get install chromium'." >&2
fi
