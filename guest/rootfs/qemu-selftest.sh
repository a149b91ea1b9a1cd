#!/usr/bin/env bash
# Boots the guest kernel + initramfs under QEMU with kvmfork.selftest=1 and
# waits for the agent's verdict. A development probe, not part of kvmfork:
# kvmfork's own VMM replaces QEMU. Needs /dev/kvm; takes minutes on PVM hosts.
#
# usage: guest/rootfs/qemu-selftest.sh [vmlinux] [initramfs.cpio]
#   defaults: the outputs of guest/kernel/build.sh and guest/rootfs/build.sh
# env: QEMU_LOG (console log path), QEMU_TIMEOUT (seconds, default 1200),
#      KVMFORK_EXTRA_CMDLINE (appended to the kernel command line)
# exit status: 0 on KVMFORK-SELFTEST-OK, 1 on failure or timeout.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GUEST_DIR=$(dirname "$HERE")
VMLINUX=${1:-$(bash "$GUEST_DIR/kernel/build.sh")/vmlinux}
INITRAMFS=${2:-$("$HERE/build.sh")/initramfs.cpio}
LOG=${QEMU_LOG:-$(mktemp /tmp/kvmfork-qemu-selftest.XXXXXX.log)}
TIMEOUT=${QEMU_TIMEOUT:-1200}

[ -c /dev/kvm ] && [ -w /dev/kvm ] || { echo "qemu-selftest: /dev/kvm is missing or not writable" >&2; exit 1; }
for f in "$VMLINUX" "$INITRAMFS"; do
    [ -f "$f" ] || { echo "qemu-selftest: $f not found" >&2; exit 1; }
done

CMDLINE="$(cat "$GUEST_DIR/kernel/cmdline.base") $(cat "$GUEST_DIR/kernel/cmdline.pvm")"
CMDLINE="$CMDLINE kvmfork.selftest=1 kvmfork.mailbox=0x8000000 memmap=4M\$0x8000000 ${KVMFORK_EXTRA_CMDLINE:-}"
echo "qemu-selftest: console log in $LOG" >&2

started=$SECONDS
timeout "$TIMEOUT" qemu-system-x86_64 -accel kvm -cpu qemu64,-cx16 \
    -machine microvm,pit=on,pic=on,rtc=off -m 512 -kernel "$VMLINUX" -initrd "$INITRAMFS" \
    -append "$CMDLINE" -nographic -no-reboot -serial mon:stdio </dev/null >"$LOG" 2>&1 &
qemu=$!
# A guest that powers off halts without ACPI, and an emulation failure
# pauses QEMU: either way QEMU stays alive, so watch the log and end it.
verdict=timeout
while kill -0 "$qemu" 2>/dev/null; do
    if grep -q 'KVMFORK-SELFTEST-OK' "$LOG"; then verdict=ok; break; fi
    if grep -qE 'KVMFORK-SELFTEST-FAIL|Kernel panic|emulation failure|KVM internal error' "$LOG"; then
        verdict=fail; break
    fi
    sleep 2
done
kill "$qemu" 2>/dev/null || true
wait "$qemu" 2>/dev/null || true

grep -E 'kvmfork-agent|KVMFORK-' "$LOG" >&2 || true
echo "qemu-selftest: $verdict after $((SECONDS - started)) s" >&2
[ "$verdict" = ok ]
