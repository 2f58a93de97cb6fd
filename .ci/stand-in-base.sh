#!/usr/bin/env bash
# Put a stand-in for the Dockerfile's base image into podman's storage, built from Debian
# packages, for machines whose container engine reaches no image registry but can reach
# Debian's package mirrors and PyPI (CI here). With the real image pullable, nothing
# needs this: `make image` and the image test use whatever `FROM` resolves to.
#
#   .ci/stand-in-base.sh [IMAGE]      (default: the Dockerfile's FROM)
#
# The stand-in is Debian 12 (bookworm, minbase) with Debian's python3, venv and CA
# certificates, `python` -> python3 in /usr/local/bin as the official images have it,
# and the host's CA bundle (package traffic may pass a TLS-inspecting gateway). Its
# Python is Debian's 3.11, not the official image's patch release; the image carries
# the label org.egress-guard.stand-in so no one mistakes it for the real base.
# It stays in podman's storage, so only the first run on a machine pays for it
# (debootstrap: a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:-$(awk '$1 == "FROM" { print $2; exit }' Dockerfile)}
case $image in */*) ;; *) image=docker.io/library/$image ;; esac
if podman image exists "$image"; then
  exit 0
fi
for tool in podman debootstrap chroot; do
  command -v "$tool" >/dev/null || { echo "stand-in-base: needs $tool" >&2; exit 1; }
done
[ "$(id -u)" -eq 0 ] || { echo "stand-in-base: debootstrap needs root" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/fs
echo "stand-in-base: debootstrapping Debian bookworm for $image (first run only)" >&2
debootstrap --variant=minbase bookworm "$root" >"$work/debootstrap.log" 2>&1 || {
  tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
cp /etc/resolv.conf "$root/etc/resolv.conf"
chroot "$root" /bin/sh -ec >"$work/packages.log" 2>&1 '
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends python3 python3-venv ca-certificates
  apt-get clean
  rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log
  ln -sf /usr/bin/python3 /usr/local/bin/python
  ln -sf /usr/bin/python3 /usr/local/bin/python3' || { tail -n 30 "$work/packages.log" >&2; exit 1; }
rm -f "$root/etc/resolv.conf"
# Trust what this host trusts, pip included (it would use its own bundle otherwise).
if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$root/etc/pip.conf"
fi
tar -C "$root" -c . | podman import --quiet \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'LABEL org.egress-guard.stand-in=debian-bookworm-python3' \
  --change 'CMD ["python3"]' \
  - "$image" >/dev/null
echo "stand-in-base: imported $image" >&2
