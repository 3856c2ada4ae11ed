#!/usr/bin/env bash
# Build the container image with the recipe of ../shared/CONTAINER.md (podman with chroot
# isolation from a locally made Debian base: no Docker engine, no registry) and try it as
# its user: `twoway demo`, then the health check against a running `twoway serve` and
# worker (`twoway status --check` and GET /healthz). The base image is kept between runs
# (localhost/debian-py:bookworm); the project's image is removed afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS

need=()
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

work=$(mktemp -d)
ctr="" mnt="" pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -- "-$p" 2>/dev/null || true; done   # each its own group
  for p in "${pids[@]}"; do
    for _ in $(seq 1 50); do kill -0 -- "-$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 -- "-$p" 2>/dev/null || true
  done
  if [ -n "$mnt" ]; then
    umount "$mnt/proc" 2>/dev/null || true
    umount "$mnt/dev" 2>/dev/null || true
  fi
  if [ -n "$ctr" ]; then
    podman umount "$ctr" >/dev/null 2>&1 || true
    podman rm -f "$ctr" >/dev/null 2>&1 || true
  fi
  podman rmi -f twoway:ci >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

base=docker.io/library/python:3.11-slim-bookworm
if ! podman image exists "$base"; then
  echo "image: making the local stand-in for $base (debootstrap)"
  mirror=$(apt-get indextargets --format '$(REPO_URI)' | grep -v security | sort -u | head -1)
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm \
    "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log"; exit 1; }
  tar -C "$work/rootfs" -c . | podman import - localhost/debian-py:bookworm >/dev/null 2>&1
  rm -rf "$work/rootfs"
  mkdir "$work/base"
  cp /etc/ssl/certs/ca-certificates.crt "$work/base/"
  cat >"$work/base/Containerfile" <<'EOC'
FROM localhost/debian-py:bookworm
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
RUN python3 -m venv /usr/local
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt
EOC
  podman build -q --isolation=chroot --network=host -t "$base" "$work/base" >/dev/null
fi
echo "image: base ready after $((SECONDS - started)) s"

podman build -q --isolation=chroot --network=host --pull=never --format docker -t twoway:ci . >/dev/null
echo "image: twoway:ci built after $((SECONDS - started)) s"
podman image inspect twoway:ci --format '{{.Config.Healthcheck.Test}}' | grep -q 'status --check'

ctr=$(podman create --cgroups=disabled twoway:ci)
mnt=$(podman mount "$ctr")
mount --bind /dev "$mnt/dev"
mount -t proc proc "$mnt/proc"
as_user() { chroot --userspec=10001:10001 "$mnt" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin \
  HOME=/app/data TWOWAY_DATABASE_URL= /bin/sh -c "cd /app/data && $1"; }
# In the background, in a process group of its own (setsid), so cleanup can end all of it.
in_background() { setsid chroot --userspec=10001:10001 "$mnt" /usr/bin/env -i \
  PATH=/usr/local/bin:/usr/bin:/bin HOME=/app/data TWOWAY_DATABASE_URL= \
  /bin/sh -c "cd /app/data && exec $1" >"$2" 2>&1 & pids+=($!); }

as_user 'twoway demo --dir /app/data/demo' >"$work/demo.out"
grep -q "Prospects (2)" "$work/demo.out" || { cat "$work/demo.out"; echo "image: twoway demo failed"; exit 1; }
echo "image: twoway demo ran inside the image as uid 10001"

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cfg=/app/data/demo/twoway.yaml
in_background "twoway --config $cfg serve --port $port" "$work/serve.log"
if as_user "twoway --config $cfg status --check" >/dev/null 2>&1; then
  echo "image: status --check passed with no worker running"; exit 1
fi
in_background "twoway --config $cfg run" "$work/worker.log"
healthz() { python3 -c "import sys, urllib.request
try:
    urllib.request.urlopen('http://127.0.0.1:$port/healthz', timeout=5)
except Exception as e:
    sys.exit(f'{e}')"; }
ok=""
for _ in $(seq 1 60); do
  if healthz 2>/dev/null && as_user "twoway --config $cfg status --check" >/dev/null 2>&1; then ok=1; break; fi
  sleep 0.5
done
if [ -z "$ok" ]; then
  healthz || true; cat "$work/serve.log" "$work/worker.log"; echo "image: the health check never passed"; exit 1
fi
echo "image: /healthz and status --check pass inside the image (serve + worker); $((SECONDS - started)) s in all"
