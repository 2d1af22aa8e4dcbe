#!/bin/sh
# Builds a Debian bookworm base image with python3 from Debian's own packages, for
# machines that can reach a Debian mirror but no container registry:
#   docker/base-image.sh [TAG] [MIRROR]     (root; needs debootstrap)
# then: docker build --build-arg BASE_IMAGE=llmesh-base:bookworm -f docker/Dockerfile .
# Does nothing when TAG already exists (delete it to rebuild).
set -eu
TAG=${1:-llmesh-base:bookworm}
MIRROR=${2:-http://deb.debian.org/debian}
if docker image inspect "$TAG" > /dev/null 2>&1; then
    echo "base image $TAG exists"
    exit 0
fi
ROOTFS=$(mktemp -d /tmp/llmesh-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$ROOTFS" "$MIRROR" > "$ROOTFS.log" 2>&1 || { tail -20 "$ROOTFS.log"; exit 1; }
rm -f "$ROOTFS.log"
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
tar -C "$ROOTFS" -c . | docker import -c 'ENV LANG=C.UTF-8' - "$TAG"
echo "base image $TAG built from $MIRROR"
