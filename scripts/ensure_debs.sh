#!/usr/bin/env bash
# Make sure the Debian packages that hold our offline data are installed (with --browser, also Chromium,
# which the tests use to render report.html headless).
# As root: installs what is missing with apt-get. Otherwise: one line saying what to run, exit 1.
set -euo pipefail
declare -A probe=(
  [dataset-fashion-mnist]=/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
  [python3.11-doc]=/usr/share/doc/python3.11/html/_sources/library/functions.rst.txt
  [wordnet-base]=/usr/share/wordnet/data.noun
)
if [ "${1:-}" = "--browser" ]; then
  probe[chromium]=/usr/bin/chromium
fi
missing=()
for pkg in "${!probe[@]}"; do
  [ -e "${probe[$pkg]}" ] || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "slimtorch needs Debian packages (offline data, and Chromium for the tests); run: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
