#!/usr/bin/env bash
# Kernel smoke test: boots the cached guest kernel (guest/kernel/build.sh)
# under QEMU with a tiny busybox initramfs whose /init runs probe.c, and
# passes only if the probe passed and the guest rebooted by itself.
#
#   bash guest/kernel/smoke/run.sh          # exit 0 = pass
#
# Needs /dev/kvm (fails loudly without it), qemu-system-x86_64, gcc with a
# static glibc, busybox-static, cpio. QEMU is only a development probe here;
# kvmfork's own VMM boots the same vmlinux. Env: KVMFORK_SMOKE_CPU (QEMU -cpu,
# default qemu64,-cx16 as in kvm-host.md; "host,-arch-capabilities" mirrors
# kvmfork's VMM), KVMFORK_SMOKE_TIMEOUT (seconds, default 900; a boot takes ~1 min
# on an idle PVM host, several under load), KVMFORK_SMOKE_KEEP=1 keeps the work dir.
set -euo pipefail

smoke_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
kernel_dir=$(dirname "$smoke_dir")
cpu=${KVMFORK_SMOKE_CPU:-qemu64,-cx16}
timeout_s=${KVMFORK_SMOKE_TIMEOUT:-900}
mailbox=0x8000000   # KVMFORK_MAILBOX_GPA in guest/contract.h

started=$SECONDS
say() { printf '[kernel-smoke %4ds] %s\n' "$((SECONDS - started))" "$*" >&2; }
die() { say "FAIL: $*"; exit 1; }

[[ -c /dev/kvm && -w /dev/kvm ]] || die "/dev/kvm is missing or not writable: this test needs KVM"
for tool in qemu-system-x86_64 gcc cpio; do
    command -v "$tool" >/dev/null || die "$tool not found"
done
busybox=$(command -v busybox || true)
# A dynamically linked busybox would need its libraries in the initramfs.
[[ -n $busybox ]] && ! readelf -l "$busybox" | grep -q INTERP ||
    die "a statically linked busybox is needed (apt-get install busybox-static)"

out=$(bash "$kernel_dir/build.sh") || die "kernel build failed"
vmlinux=$out/vmlinux

work=$(mktemp -d /tmp/kvmfork-kernel-smoke.XXXXXX)
qemu_pid=
cleanup() {
    local status=$1
    [[ -n $qemu_pid ]] && kill "$qemu_pid" 2>/dev/null || true
    # A failed run keeps its console log and initramfs for inspection.
    if [[ $status != 0 || ${KVMFORK_SMOKE_KEEP:-0} == 1 ]]; then
        say "work dir kept: $work"
    else
        rm -rf "$work"
    fi
}
trap 'cleanup $?' EXIT

root=$work/root
mkdir -p "$root"/{bin,proc,sys,dev}
cp "$busybox" "$root/bin/busybox"
for applet in sh mount cat echo dmesg grep reboot; do ln -s busybox "$root/bin/$applet"; done
gcc -O2 -Wall -static -pthread -o "$root/probe" "$smoke_dir/probe.c" || die "cannot build probe.c"
cat > "$root/init" <<EOF
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "SMOKE-INIT uptime \$(cat /proc/uptime)"
sh -c 'exit 3'; [ \$? = 3 ] || echo "SMOKE-FAIL shell exit status"
/probe $mailbox && echo "SMOKE-PROBE-OK" || echo "SMOKE-FAIL probe"
dmesg | grep -E "WARNING|BUG|Unknown kernel command line" || true
echo "SMOKE-DONE uptime \$(cat /proc/uptime)"
reboot -f
EOF
chmod +x "$root/init"
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) > "$work/initramfs.cpio"

cmdline="$(cat "$kernel_dir/cmdline.base") $(cat "$kernel_dir/cmdline.pvm") kvmfork.mailbox=$mailbox memmap=4M\$$mailbox"
log=$work/console.log
say "booting $vmlinux (-cpu $cpu); console log: $log"
# -device i8042: microvm has no keyboard controller, and reboot=k resets through it.
timeout "$timeout_s" qemu-system-x86_64 -accel kvm -cpu "$cpu" \
    -machine microvm,pit=on,pic=on,rtc=off -device i8042 -m 256 \
    -kernel "$vmlinux" -initrd "$work/initramfs.cpio" -append "$cmdline" \
    -nographic -no-reboot </dev/null >"$log" 2>&1 &
qemu_pid=$!

# An emulation failure pauses QEMU instead of ending it: watch the log.
verdict=
while kill -0 "$qemu_pid" 2>/dev/null; do
    if grep -qE 'emulation failure|KVM internal error|Kernel panic|SMOKE-FAIL' "$log"; then
        verdict=fail; break
    fi
    sleep 1
done
if [[ -z $verdict ]]; then
    wait "$qemu_pid" && rc=0 || rc=$?
    qemu_pid=
    ((rc != 124)) || die "no result within ${timeout_s}s (log: $log)"
fi

grep -E '^probe|SMOKE-|Run /init' "$log" >&2 || true
if [[ $verdict != fail ]] && grep -q SMOKE-PROBE-OK "$log" && grep -q SMOKE-DONE "$log"; then
    say "PASS: $(grep 'Run /init' "$log" | head -1 | tr -s ' '); the guest rebooted itself"
    exit 0
fi
tail -n 30 "$log" >&2
die "see the console log above"
