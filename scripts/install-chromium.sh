#!/usr/bin/env bash
# Installs Chromium from Debian's packages for the playground's browser tests (Playwright drives the system
# browser; `playwright install` downloads a browser build of its own, which we never do).
set -euo pipefail
if command -v chromium >/dev/null; then exit 0; fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
