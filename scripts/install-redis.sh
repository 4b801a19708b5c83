#!/usr/bin/env bash
# Installs redis-server from Debian's packages (the Redis tier's tests start their own on loopback).
set -euo pipefail
if command -v redis-server >/dev/null; then exit 0; fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
# The package starts a system service on 6379; our tests start their own servers, so stop it.
($SUDO service redis-server stop || true) >/dev/null 2>&1
