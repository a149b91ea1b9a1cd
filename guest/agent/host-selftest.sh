#!/usr/bin/env bash
# Runs the agent's self-test on the build machine: unpacks the initramfs
# into a temporary directory and runs `/init --selftest` chrooted into it.
# Same binary, same Python tree, same request path as in the guest; only
# the mailbox is a private anonymous mapping and nothing is PID 1. Needs
# root (chroot) and takes seconds, so it is the quick check before a guest
# boot.
#
# usage: guest/agent/host-selftest.sh [initramfs.cpio]   (default: build it)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOTFS_DIR=$(dirname "$HERE")/rootfs
INITRAMFS=${1:-$("$ROOTFS_DIR/build.sh")/initramfs.cpio}

[ "$(id -u)" -eq 0 ] || { echo "host-selftest: needs root for chroot" >&2; exit 1; }
tree=$(mktemp -d /tmp/kvmfork-agent-selftest.XXXXXX)
trap 'rm -rf "$tree"' EXIT
python3 "$ROOTFS_DIR/rootfs_tool.py" extract "$INITRAMFS" "$tree"
# /proc for the self-test's page-fault and dirty-page accounting.
mount -t proc proc "$tree/proc"
trap 'umount "$tree/proc"; rm -rf "$tree"' EXIT
chroot "$tree" /init --selftest
