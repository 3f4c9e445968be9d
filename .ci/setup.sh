#!/usr/bin/env bash
# Set-up on a fresh Debian/Ubuntu machine: the Fashion-MNIST files, SLURM (for
# tests/slurm_test.py, which starts its own one-node cluster) and a venv with
# requirements.txt. Idempotent: a second call only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || packages+=(dataset-fashion-mnist)
dpkg -s slurmctld slurmd slurm-client munge > /dev/null 2>&1 || packages+=(slurmctld slurmd slurm-client munge)
if (( ${#packages[@]} )); then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}"
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
