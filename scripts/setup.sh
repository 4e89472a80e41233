#!/usr/bin/env bash
# Create .venv (Python >= 3.11) and install mergeflow with everything it needs. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=""
for candidate in python3.11 python3.12 python3.13 python3; do
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    PY="$candidate"; break
  fi
done
if [ -z "$PY" ]; then
  echo "mergeflow needs Python >= 3.11 (e.g. apt-get install python3.11 python3.11-venv)" >&2
  exit 1
fi
# Debian data: the text zoo (WordNet glosses, fortunes in four languages, Unicode emoji names) and the
# vision zoo and analyses (Fashion-MNIST, Noto Color Emoji, openclipart drawings).
DEBIAN_DATA="wordnet-base fortunes fortunes-de fortunes-es fortunes-it unicode-data dataset-fashion-mnist
  fonts-noto-color-emoji openclipart-png"
missing=""
for pkg in $DEBIAN_DATA; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    echo "note: the text zoo needs these Debian packages; install them with: sudo apt-get install$missing" >&2
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
# Installed already from these exact files (and findable)? Then there is nothing to do: a rerun of
# the demo should not spend 15 s asking pip again (delete .venv/.mergeflow-installed to reinstall).
STAMP=.venv/.mergeflow-installed
WANT="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $(python -V 2>&1)"
FOUND='import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ("mergeflow", "flows", "torch", "prefect")))'
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && python -c "$FOUND" 2>/dev/null; then
  exit 0
fi
rm -f "$STAMP"
python -m pip install --quiet --upgrade pip
# torch/torchvision first, pinned: open_clip needs a torchvision built for the same torch.
# --no-cache-dir: pip's wheel cache would keep a second copy of several GB of CUDA libraries.
python -m pip install --quiet --no-cache-dir "torch==2.14.1" "torchvision==0.29.1"
python -m pip install --quiet --no-cache-dir -e ".[test]"
echo "$WANT" > "$STAMP"
