#!/usr/bin/env bash
# The default corpus of `xlkernels reproduce` / `eval`: GNOME Help (Debian gnome-user-docs, CC BY-SA 3.0),
# extracted into <venv>/share/help with apt-get download + dpkg-deb (no install, no yelp). Skipped when present.
set -euo pipefail
VENV=${1:-.venv}
DEST=$VENV/share/help
[[ -f $DEST/C/gnome-help/index.page || -f /usr/share/help/C/gnome-help/index.page ]] && exit 0
if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
  echo "note: no apt-get/dpkg-deb; the default corpus (gnome-user-docs) is missing: reproduce/eval need --corpus FILE" >&2
  exit 0
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
get() { (cd "$tmp" && apt-get download -q "gnome-user-docs=${1}" >/dev/null 2>&1); }
get 43.0-2 || { apt-get update -qq >/dev/null 2>&1 || true; get 43.0-2; } || get '*' || {
  echo "note: apt-get download gnome-user-docs failed; reproduce/eval need --corpus FILE" >&2; exit 0; }
dpkg-deb -x "$tmp"/gnome-user-docs_*.deb "$tmp/x"
mkdir -p "$VENV/share"
rm -rf "$DEST" && cp -r "$tmp/x/usr/share/help" "$DEST"
echo "GNOME Help $(dpkg-deb -f "$tmp"/gnome-user-docs_*.deb Version) -> $DEST"
