#!/usr/bin/env bash
# System packages the project needs: FluidSynth and the MuseScore General soundfont (rendering),
# Chromium (the test that opens the sweep's report page in a headless browser).
# Idempotent: installs only what is missing.
set -euo pipefail
need=()
command -v fluidsynth >/dev/null 2>&1 || need+=(fluidsynth)
ls /usr/share/sounds/sf2/MuseScore_General.sf* >/dev/null 2>&1 \
  || ls /usr/share/sounds/sf3/MuseScore_General.sf* >/dev/null 2>&1 \
  || need+=(musescore-general-soundfont)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "installing system packages: ${need[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${need[@]}"
fi
