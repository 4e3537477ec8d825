#!/usr/bin/env bash
# Install Debian's Chromium for tests/test_report.py (headless rendering of `builder report`'s page),
# unless a chromium is already on PATH. Needs root (or sudo) and the Debian package archive.
#   .ci/chromium.sh            then: chromium --version
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    echo "chromium already installed: $(chromium --version 2>/dev/null || echo 'version unknown')"
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo); fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q --no-install-recommends chromium
chromium --version
