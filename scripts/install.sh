#!/usr/bin/env bash
# Installs cmath with everything for training, export, tests and benchmarks into .venv (CPU only).
# torch==2.13.0 first: it is the local CPU build; a plain `torch` requirement could pull a multi-GB CUDA build.
# A complete .venv is left as it is: the last successful install writes .venv/.cmath-install, the hash of
# pyproject.toml and of this script plus this checkout's path; while that matches, pip is not run again
# (delete the file, or change pyproject.toml, to reinstall).
set -euo pipefail
cd "$(dirname "$0")/.."
# HAProxy: the load balancer of `cmath-serve --replicas` (docs/scaling.md), from the distribution's packages;
# only when missing and where apt-get exists (as root, or through sudo). Tests that need it skip without it.
if ! command -v haproxy >/dev/null && [ ! -x /usr/sbin/haproxy ] && command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq haproxy >/dev/null; } \
        || echo "install.sh: could not install haproxy with apt-get; the replica tests will skip" >&2
fi
# Chromium and its driver: the headless browser of the demo page's test (tests/test_demo.py, marker `browser`), from
# the distribution's packages, the same way; that test skips without them.
if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; } \
        || echo "install.sh: could not install chromium with apt-get; the browser test will skip" >&2
fi
STAMP=.venv/.cmath-install
WANT="$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1) $PWD"
if [ -x .venv/bin/python ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ]; then
    echo "install.sh: .venv is complete for this pyproject.toml; nothing to install"
    exit 0
fi
python3 -m venv .venv
# --no-compile: modules are byte-compiled when first imported instead of all at install (most of torch's and the
# tools' thousands of files are never imported by cmath), which more than halves the install's time.
.venv/bin/python -m pip install -q --no-compile --upgrade pip
.venv/bin/python -m pip install -q --no-compile torch==2.13.0
.venv/bin/python -m pip install -q --no-compile -e '.[dev]'
echo "$WANT" > "$STAMP"
