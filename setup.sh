#!/usr/bin/env bash
# Sets safeq-lab up on Debian 12, idempotently: Debian packages (Mininet, bridge-utils, iptables,
# nftables, the real clients the interop tests use), then .venv with --system-site-packages so that
# Debian's mininet imports next to our PyPI dependencies. A re-run skips what is already done.
set -euo pipefail
cd "$(dirname "$0")"
if [ "$(id -u)" != 0 ]; then
  echo "setup.sh: run it as root (e.g. sudo ./setup.sh): it installs Debian packages and the lab needs namespaces" >&2
  exit 1
fi
packages=(mininet bridge-utils iptables nftables iproute2 iputils-ping tcpdump util-linux kmod procps
          python3 python3-venv
          curl lftp ldap-utils snmp snmptrapd rdate cups-ipp-utils openssl nmap netcat-openbsd
          swaks libnet-ssleay-perl libio-socket-ssl-perl freetds-bin postgresql-client openssh-client dnsutils
          samba-common-bin smbclient gnutls-bin
          libnetfilter-queue-dev python3-dev build-essential chromium
          libxml2-utils vagrant)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup.sh: installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup.sh: creating .venv (system site packages, for Debian's mininet)"
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.safeq-lab-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ tox.ini -nt "$stamp" ]; then
  echo "setup.sh: installing safeq-lab and tox into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]' tox
  touch "$stamp"
fi
echo "setup.sh: ready (.venv/bin/safeq-lab)"
