#!/usr/bin/env bash
# The Debian packages `make run` and `make test` use, installed when they are missing.
#
#   bash scripts/system_deps.sh run    # what serving uses: Tesseract (rus, chi_sim), g++ (the compiled decode step)
#   bash scripts/system_deps.sh test   # that, plus what the tests draw and start (fonts, ...)
#
# As root (or through sudo when it needs no password) the missing packages are installed with
# apt-get. Otherwise one line says what to install, and the script exits 0: the server runs
# without them (RapidOCR only) and the tests that need them are skipped with that reason.
set -u
mode=${1:-run}

# "probe|package": the package is missing when the probe (a path, or cmd:NAME) is not found.
RUN_NEEDS=(
  "/usr/share/tesseract-ocr/5/tessdata/eng.traineddata|tesseract-ocr"
  "/usr/share/tesseract-ocr/5/tessdata/rus.traineddata|tesseract-ocr-rus"
  "/usr/share/tesseract-ocr/5/tessdata/chi_sim.traineddata|tesseract-ocr-chi-sim"
  "cmd:g++|g++"
)
TEST_NEEDS=(
  "font:DejaVuSans|fonts-dejavu-core"
  "font:NotoSansCJK|fonts-noto-cjk"
  "cmd:curl|curl"
  "/usr/lib/postgresql|postgresql"
  "cmd:chromium|chromium"
  "cmd:redis-server|redis-server"
)

needs=("${RUN_NEEDS[@]}")
[ "$mode" = test ] && needs+=("${TEST_NEEDS[@]}")

missing=()
for item in "${needs[@]}"; do
  probe=${item%%|*}
  pkg=${item#*|}
  case "$probe" in
    cmd:*) command -v "${probe#cmd:}" >/dev/null 2>&1 && continue ;;
    font:*) fc-list 2>/dev/null | grep -qi "${probe#font:}" && continue ;;
    *) [ -e "$probe" ] && continue ;;
  esac
  missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ]; then
  sudo_cmd=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo_cmd=(sudo -n)
else
  echo "note: missing system packages (features that need them are off, their tests skipped): sudo apt-get install ${missing[*]}" >&2
  exit 0
fi

echo "installing system packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { "${sudo_cmd[@]}" apt-get update -qq && "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null; }; then
  echo "note: could not install system packages (features that need them are off, their tests skipped): apt-get install ${missing[*]}" >&2
fi
exit 0
