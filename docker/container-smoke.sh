#!/usr/bin/env bash
# Build docker/Dockerfile.cpu with podman, run it, and hit it as a client would:
# /health/ready, /v1/classify with a real photo, a bad image, the image's own HEALTHCHECK, and a
# graceful stop. Works without a registry: the base image is a Debian rootfs made by debootstrap
# and imported into podman. Run as root (apt-get installs podman, runc and debootstrap if missing).
#
#   make container-smoke                    # or: bash docker/container-smoke.sh
#   TORCH_INDEX_URL=<an index of CPU-only torch wheels> make container-smoke   # smaller image
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${BASE_IMAGE:-localhost/hiera-debian:bookworm}
IMAGE=${IMAGE:-localhost/hiera-serve:cpu-smoke}
# pip uses its configured index (the host's pip.conf is lent to the build), so by default torch
# is the CUDA build that also runs on the CPU; TORCH_INDEX_URL adds an index of CPU-only builds
# for a much smaller image.
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
PORT=${PORT:-18080}
NAME=hiera-smoke-$$
# crun refuses this kernel's hybrid cgroup layout; runc runs it.
PODMAN=(podman --runtime runc)
ULIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

started=$(date +%s)
say() { printf '[container-smoke %4ss] %s\n' "$(($(date +%s) - started))" "$*"; }

missing=()
for tool in podman runc debootstrap curl; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" != 0 ]; then
        echo "container-smoke: missing ${missing[*]}; apt-get install ${missing[*]}" >&2
        exit 1
    fi
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! podman image exists "$BASE_IMAGE"; then
    say "debootstrap a Debian bookworm rootfs for $BASE_IMAGE"
    rootfs=$(mktemp -d)
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,libgomp1 \
        bookworm "$rootfs" >/dev/null  # debootstrap's default mirror
    tar -C "$rootfs" --numeric-owner -c . | podman import - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
fi

# The image holds a ~5 GB virtualenv (CUDA torch by default); committing a layer briefly needs
# twice that. Refuse to start rather than fill a shared disk.
free_gb=$(df --output=avail -BG /var/lib/containers /var/tmp | tail -n +2 | tr -dc '0-9\n' | sort -n | head -1)
if [ "${free_gb:-0}" -lt 30 ]; then
    echo "container-smoke: only ${free_gb} GB free under /var/lib/containers or /var/tmp; need 30" >&2
    exit 1
fi

# Builds here go through a TLS-inspecting proxy: lend the build the host's CA bundle and pip
# config at build time only (volumes, never layers).
build_mounts=()
for file in /etc/ssl/certs/ca-certificates.crt /etc/pip.conf; do
    [ -f "$file" ] && build_mounts+=(-v "$file:$file:ro")
done
say "podman build -f docker/Dockerfile.cpu -t $IMAGE"
# --layers=false keeps no intermediate stage images (gigabytes each); every run builds afresh.
"${PODMAN[@]}" build --format docker --layers=false --network host "${ULIMITS[@]}" "${build_mounts[@]}" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL" \
    -f docker/Dockerfile.cpu -t "$IMAGE" . >"${SMOKE_LOG:-/tmp/container-smoke-build.log}" 2>&1 ||
    { tail -40 "${SMOKE_LOG:-/tmp/container-smoke-build.log}"; exit 1; }
say "built: $(podman image inspect --format '{{.Size}}' "$IMAGE" | numfmt --to=iec) $IMAGE"

cleanup() {
    "${PODMAN[@]}" rm -f "$NAME" >/dev/null 2>&1 || true
    # KEEP_IMAGE=1 keeps the 6 GB image for a closer look.
    [ "${KEEP_IMAGE:-0}" = 1 ] || podman rmi -f "$IMAGE" >/dev/null 2>&1 || true
}
trap cleanup EXIT
# Host network, bound to loopback only: nothing outside this machine can reach it.
# The port goes in HIERA_PORT, which the image's HEALTHCHECK reads too.
"${PODMAN[@]}" run -d --name "$NAME" --network host "${ULIMITS[@]}" -e HIERA_PORT="$PORT" \
    "$IMAGE" --host 127.0.0.1 --intra-op-threads 1 >/dev/null
say "started $NAME; waiting for /health/ready"
for _ in $(seq 300); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/health/ready")" = 200 ] && break
    [ "$(podman inspect -f '{{.State.Running}}' "$NAME")" = true ] || { podman logs "$NAME"; exit 1; }
    sleep 1
done
curl -sf "http://127.0.0.1:$PORT/health/ready" || { podman logs "$NAME" | tail -20; exit 1; }
echo
say "ready"

answer=$(curl -sf -X POST "http://127.0.0.1:$PORT/v1/classify?top_k=3" \
    -H 'Content-Type: image/jpeg' --data-binary @examples/grace_hopper.jpg)
echo "$answer"
python3 -c 'import json, sys; r = json.loads(sys.argv[1]); assert len(r["labels"]) == 3, r' "$answer"
status=$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$PORT/v1/classify" \
    -H 'Content-Type: image/jpeg' --data-binary @README.md)
[ "$status" = 415 ] || { echo "a text file got $status, not 415" >&2; exit 1; }
say "classify answered 200 with 3 labels; a non-image got 415"

# The image's own exec-form HEALTHCHECK, run inside the container as the non-root user.
# (podman warns that it cannot schedule periodic checks without systemd; this runs one now.)
health=$("${PODMAN[@]}" healthcheck run "$NAME" 2>/dev/null) || { echo "HEALTHCHECK: $health" >&2; exit 1; }
say "HEALTHCHECK passed inside the container"
user=$("${PODMAN[@]}" exec "$NAME" id -u)
[ "$user" = 10001 ] || { echo "runs as uid $user, not 10001" >&2; exit 1; }
say "runs as uid $user"

"${PODMAN[@]}" stop -t 40 "$NAME" >/dev/null
code=$(podman inspect -f '{{.State.ExitCode}}' "$NAME")
[ "$code" = 0 ] || { podman logs "$NAME" | tail -20; echo "exit code $code after SIGTERM" >&2; exit 1; }
say "SIGTERM drained and exited 0; total $(($(date +%s) - started)) s"
