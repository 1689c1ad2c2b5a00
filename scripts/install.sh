#!/usr/bin/env bash
# Installs everything corral needs on a fresh Debian 12 machine (as root):
# the Debian packages it drives or tests against, and a virtualenv in .venv
# with corral and its pinned Python dependencies. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3 python3-venv python3-pip         # the interpreter corral runs on
  iproute2 nftables libnftables1           # netns, veth, routes; the firewall (in-process)
  libseccomp2                              # seccomp filters (through pyseccomp)
  ca-certificates openssl                  # host roots; test CA tooling
  busybox-static                           # test images: a small busybox image
  docker-registry                          # the reference OCI registry, in tests
  bubblewrap                               # a baseline in bench/startup_bench.py
  curl bind9-dnsutils netcat-openbsd       # real clients for the tools test image
  iperf3 wrk                               # data path benchmarks
  gcc libc6-dev                            # tests compile small static seccomp probes
  procps psmisc iputils-ping               # ps, pkill, ping used by tests
)

if [[ $(id -u) -ne 0 ]]; then
  echo "install.sh: run as root (corral manages namespaces, cgroups and nftables)" >&2
  exit 1
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if (( ${#missing[@]} )); then
  echo "install.sh: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian registry package starts a service on :5000 where systemd runs; corral's tests
# start their own registries in namespaces and want no stray one listening.
if command -v systemctl >/dev/null && systemctl is-active -q docker-registry 2>/dev/null; then
  systemctl disable --now docker-registry >/dev/null 2>&1 || true
fi

PY=/usr/bin/python3
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.corral-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp || constraints.txt -nt $stamp ]]; then
  .venv/bin/pip install -q --upgrade pip
  # pyproject.toml says which versions corral works with (ranges); constraints.txt pins
  # the exact ones CI tests, so every machine gets the same.
  .venv/bin/pip install -q -c constraints.txt -e '.[dev]'
  touch "$stamp"
fi
echo "install.sh: ready (.venv/bin/corral)"
