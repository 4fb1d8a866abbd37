#!/usr/bin/env bash
# Installs Debian's chromium for the browser test of the HTML report (tests only; the demo does not need it).
set -uo pipefail
# The HTML report test renders a page in Debian's chromium; it is skipped (with its reason) when absent.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  ($SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "setup: chromium could not be installed; the browser test of the HTML report will be skipped" >&2
fi
