#!/usr/bin/env bash
# Debian packages the tests use as real peers: DCMTK (storescu/echoscu/storescp/dcmdump/dsrdump) and Orthanc.
set -euo pipefail
need=()
command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
command -v Orthanc >/dev/null 2>&1 || need+=(orthanc)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} from Debian"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Orthanc's Debian package starts a system instance on 4242/8042; the tests run their own.
if command -v service >/dev/null 2>&1 && pgrep -x Orthanc >/dev/null 2>&1; then service orthanc stop >/dev/null 2>&1 || true; fi
exit 0
