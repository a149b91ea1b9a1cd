#!/bin/busybox sh
# /init of the nested QEMU guest built by tests/hw-kvm/run.sh (busybox ash).
#
# Loads Debian's kvm, kvm-amd and irqbypass modules (QEMU's TCG emulates AMD
# SVM with nested paging, so this is hardware-style KVM, not PVM), builds the
# Python and Node templates with the host's release kvmfork, runs the
# `kvmfork run`, `kvmfork serve` (HTTP) and `kvmfork bench fork` checks, and
# powers off. Every result is one console line the host script parses:
#
#   HWKVM PLAN <number of checks> <check>...
#   HWKVM PASS <check>
#   HWKVM FAIL <check>: <why>
#   HWKVM PHASE <name> <seconds>
#   HWKVM OUT <line of command output worth showing>
#   HWKVM SUMMARY passed=<n> failed=<m> seconds=<guest uptime>
#
# Layout (made by run.sh): /kvmfork/bin/kvmfork, /kvmfork/vmlinux,
# /kvmfork/rootfs-{python,node}.cpio, /kvmfork/guest/kernel/cmdline.*,
# /kvmfork/modules/*.ko, busybox as /bin/busybox.
set -u
/bin/busybox mkdir -p /proc /sys /dev /tmp /root /usr/bin /usr/sbin /sbin
/bin/busybox --install -s /bin
export PATH=/kvmfork/bin:/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || true
mount -t tmpfs -o size=90% tmpfs /tmp
# Kernel messages at warning level and below would interleave with results.
echo 4 >/proc/sys/kernel/printk

# The checks, in the order they report; the host verifies that each one was
# reported exactly once.
PLAN="modules dev-kvm svm-cpuinfo template-python run-print run-numpy run-exception
run-timeout run-after-timeout template-node host-kind-hardware run-node
serve-start serve-health serve-exec serve-batch serve-unauthorized serve-malformed
tenant-cpuid-flags tenant-vmrun-faults tenant-vmxon-faults tenant-perf-denied
serve-session serve-session-fork serve-session-restore run-urandom serve-metrics serve-stop bench-fork
tlb-remap npt0-reload npt0-run-print npt0-run-numpy npt0-host-caps npt0-bench-fork npt0-tlb-remap"
set -- $PLAN
# (A fresh line: the firmware leaves terminal escapes on the console.)
echo
echo "HWKVM PLAN $# $*"

passed=0
failed=0
uptime_s() { cut -d' ' -f1 /proc/uptime; }
pass() { passed=$((passed + 1)); echo "HWKVM PASS $1"; }
fail() { failed=$((failed + 1)); echo "HWKVM FAIL $1: $2"; }
# Diagnostics after a FAIL: kvmfork's own error lines (an error may be
# followed by a long guest console dump), then the file's last lines.
show() {
    {
        grep '^kvmfork' "$1" 2>/dev/null | head -n 5
        echo "(last lines of $(basename "$1"):)"
        tail -n "${2:-15}" "$1" 2>/dev/null
    } | while IFS= read -r line; do echo "HWKVM OUT   $line"; done
}
# The first phase, "boot", is the kernel's boot up to /init (uptime 0 on).
phase_start=0
phase() {
    local now
    now=$(uptime_s)
    echo "HWKVM PHASE $1 $(awk -v a="$phase_start" -v b="$now" 'BEGIN { printf "%.1f", b - a }')"
    phase_start=$now
}
finish() {
    echo "HWKVM SUMMARY passed=$passed failed=$failed seconds=$(uptime_s)"
    sync
    poweroff -f
    # poweroff -f does not return; if it does, make the kernel stop QEMU.
    exit 1
}

W=/tmp/hwkvm
mkdir -p "$W"
export KVMFORK_CACHE_DIR=/tmp/kvmfork-cache KVMFORK_GUEST_DIR=/kvmfork/guest
# run.sh passes the host's KVMFORK_EXTRA_CMDLINE on (template kernel command line).
if [ -f /kvmfork/extra-cmdline ]; then
    export KVMFORK_EXTRA_CMDLINE="$(cat /kvmfork/extra-cmdline)"
    echo "HWKVM OUT KVMFORK_EXTRA_CMDLINE=$KVMFORK_EXTRA_CMDLINE"
fi
echo "HWKVM OUT kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) CPUs, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB"
phase boot

# --- KVM -------------------------------------------------------------------
if { insmod /kvmfork/modules/irqbypass.ko && insmod /kvmfork/modules/kvm.ko &&
    insmod /kvmfork/modules/kvm-amd.ko; } 2>"$W/insmod.err"; then
    pass modules
else
    fail modules "insmod failed: $(cat "$W/insmod.err" 2>/dev/null)"
fi
dmesg | grep -E 'SVM|kvm' | while IFS= read -r line; do echo "HWKVM OUT dmesg: $line"; done
if [ -c /dev/kvm ]; then pass dev-kvm; else fail dev-kvm "/dev/kvm is missing after loading kvm-amd"; fi
if grep -qw svm /proc/cpuinfo && grep -qw npt /proc/cpuinfo; then
    pass svm-cpuinfo
else
    fail svm-cpuinfo "/proc/cpuinfo lacks the svm or npt flag (QEMU -cpu max should have both)"
fi
phase kvm

# --- templates and `kvmfork run` ------------------------------------------------
# Templates are built here: a template is tied to the kind of host KVM that
# booted it. Everything is TCG-slow, so independent work overlaps: the Python
# `kvmfork run` checks (two lanes) run while the Node template is being built.
build_template() { # language; writes $W/template-<language>.{err,dir,rc}
    local lang=$1 rc=0
    kvmfork template build --language "$lang" --kernel /kvmfork/vmlinux \
        --initrd "/kvmfork/rootfs-$lang.cpio" --boot-timeout 240 \
        >"$W/template-$lang.dir" 2>"$W/template-$lang.err" || rc=$?
    echo "$rc" >"$W/template-$lang.rc"
}
check_template() { # language
    local lang=$1 dir
    dir=$(tail -n 1 "$W/template-$lang.dir")
    if [ "$(cat "$W/template-$lang.rc")" != 0 ]; then
        fail "template-$lang" "kvmfork template build --language $lang exited $(cat "$W/template-$lang.rc")"
        show "$W/template-$lang.err" 25
    elif [ ! -f "$dir/state.snap" ]; then
        fail "template-$lang" "template build printed '$dir', which has no state.snap"
    else
        pass "template-$lang"
    fi
    grep -E '\] (host|boot|snapshot|verify|done):' "$W/template-$lang.err" | grep -v 'guest running' |
        while IFS= read -r line; do echo "HWKVM OUT $lang: $line"; done
    msr_denials "$W/template-$lang.err" "$lang boot"
}
# msr_denials <log> <label>: every MSR access the filter denied (#GP), counted.
msr_denials() {
    grep -o 'MSR filter: guest [a-z]* 0x[0-9a-f]*' "$1" 2>/dev/null | sort | uniq -c |
        while IFS= read -r line; do echo "HWKVM OUT $2: $line denied"; done
}
# run_cmd <name> <kvmfork run args...>: $W/<name>.{out,err,rc,secs}.
run_cmd() {
    local name=$1 rc=0 t0
    shift
    t0=$(uptime_s)
    kvmfork run "$@" >"$W/$name.out" 2>"$W/$name.err" || rc=$?
    echo "$rc" >"$W/$name.rc"
    awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN { printf "%.1f\n", b - a }' >"$W/$name.secs"
}
# expect_out <check> <expected stdout>: exit 0 and exactly that output.
expect_out() {
    local name=$1 want=$2 rc got
    rc=$(cat "$W/$name.rc")
    got=$(cat "$W/$name.out")
    echo "HWKVM OUT $name: kvmfork run took $(cat "$W/$name.secs") s"
    if [ "$rc" = 0 ] && [ "$got" = "$want" ]; then
        pass "$name"
    else
        fail "$name" "exit $rc, stdout '$got', wanted exit 0 and '$want'"
        show "$W/$name.err"
    fi
}

RAND_CODE='import os; print(os.urandom(8).hex())'
# The Node build starts once the Python one is done, so the two guests never
# boot at the same time: the emulation faults of QEMU's TCG SVM (an inner
# guest triple-faulting at its kernel entry, the nested kernel panicking at
# the first KVM_RUN; see run.sh) all came with two boots at once.
build_template python
check_template python
phase template-python
build_template node &
node_build=$!

(
    run_cmd run-print 'print(1+1)'
    run_cmd run-numpy 'import numpy as np; print(np.arange(10).mean())'
    run_cmd run-exception 'raise ValueError("hw-kvm boom")'
) &
lane_a=$!
(
    run_cmd run-timeout --timeout 1 'while True: pass'
    # The next run after a timeout still works (and gives one random value).
    run_cmd run-after-timeout "$RAND_CODE"
) &
lane_b=$!
wait "$lane_a" "$lane_b"

expect_out run-print 2
expect_out run-numpy 4.5
rc=$(cat "$W/run-exception.rc")
if [ "$rc" = 1 ] && grep -q '^Traceback' "$W/run-exception.err" &&
    grep -q 'ValueError: hw-kvm boom' "$W/run-exception.err"; then
    pass run-exception
else
    fail run-exception "exit $rc (wanted 1) or no Traceback / 'ValueError: hw-kvm boom' in stderr"
    show "$W/run-exception.err"
fi
rc=$(cat "$W/run-timeout.rc")
echo "HWKVM OUT run-timeout: kvmfork run --timeout 1 took $(cat "$W/run-timeout.secs") s"
if [ "$rc" = 124 ] && grep -q 'timed out' "$W/run-timeout.err"; then
    pass run-timeout
else
    fail run-timeout "exit $rc (wanted 124 and 'timed out' in stderr)"
    show "$W/run-timeout.err"
fi
echo "HWKVM OUT run-after-timeout: kvmfork run took $(cat "$W/run-after-timeout.secs") s"
if [ "$(cat "$W/run-after-timeout.rc")" = 0 ] && grep -qxE '[0-9a-f]{16}' "$W/run-after-timeout.out"; then
    pass run-after-timeout
else
    fail run-after-timeout "exit $(cat "$W/run-after-timeout.rc"), stdout '$(cat "$W/run-after-timeout.out")', wanted 16 hex digits"
    show "$W/run-after-timeout.err"
fi
# Randomness: this separate process's value joins twenty forks of the server
# (one batch, pooled VMs reset by copy-back) below; all must differ.
cp "$W/run-after-timeout.out" "$W/rand.all"
phase run-python

wait "$node_build"
check_template node
kinds=$(cat "$W/template-python.err" "$W/template-node.err" | grep -o 'KVM kind: [a-z]*' | tr '\n' ';')
if [ "$(grep -c 'KVM kind: hardware' "$W/template-python.err" "$W/template-node.err" | grep -c ':1$')" = 2 ]; then
    pass host-kind-hardware
else
    fail host-kind-hardware "both template builds must report 'KVM kind: hardware'; got: ${kinds:-no KVM kind line}"
fi
phase template-node
run_cmd run-node --language node 'console.log(1+1)'
expect_out run-node 2
phase run-node

# --- kvmfork serve -------------------------------------------------------------
PORT=18080
URL=http://127.0.0.1:$PORT
KEY=hwkvm-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
printf '["%s"]\n' "$KEY" >"$W/keys.json"
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up

# http <name> <method> <path> <body> [wget option...]: response body in
# $W/<name>.body, status code in $W/<name>.status (000 when no HTTP answer
# came; busybox wget saves no body for error statuses, -S shows the status).
# Bounded with timeout(1): busybox 1.35's static wget segfaults with -T.
http() {
    local name=$1 method=$2 path=$3 body=$4
    shift 4
    rm -f "$W/$name.body"
    if [ "$method" = POST ]; then
        timeout 120 wget -S -q -O "$W/$name.body" --header 'Content-Type: application/json' \
            "$@" --post-data "$body" "$URL$path" 2>"$W/$name.hdr"
    else
        timeout 120 wget -S -q -O "$W/$name.body" "$@" "$URL$path" 2>"$W/$name.hdr"
    fi
    sed -n 's/^ *HTTP\/[0-9.]* \([0-9][0-9][0-9]\).*/\1/p' "$W/$name.hdr" | tail -n 1 >"$W/$name.status"
    [ -s "$W/$name.status" ] || echo 000 >"$W/$name.status"
    touch "$W/$name.body"
}
status() { cat "$W/$1.status"; }
# expect_status <check> <name> <code>: returns 0 when matched, else fails the check.
expect_status() {
    if [ "$(status "$2")" = "$3" ]; then return 0; fi
    fail "$1" "HTTP $(status "$2"), wanted $3: $(head -c 300 "$W/$2.body") $(grep -v '^ ' "$W/$2.hdr" | head -n 2)"
    return 1
}

kvmfork serve --listen "127.0.0.1:$PORT" --api-keys-file "$W/keys.json" --shards 1 \
    --workers-per-shard 1 --pool-size 1 >"$W/serve.log" 2>&1 &
server=$!
up=
serve_t0=$(uptime_s)
deadline=$(awk -v t="$serve_t0" 'BEGIN { print t + 120 }')
while kill -0 "$server" 2>/dev/null; do
    # serve answers at once and loads its templates in the background: up
    # means both templates are ready (a failed one ends the wait).
    if timeout 10 wget -q -O "$W/health.body" "$URL/v1/health" 2>/dev/null; then
        if [ "$(grep -o '"state":"ready"' "$W/health.body" | wc -l)" -ge 2 ]; then up=1; break; fi
        if grep -q '"state":"failed"' "$W/health.body"; then break; fi
    fi
    if awk -v t="$(uptime_s)" -v d="$deadline" 'BEGIN { exit !(t > d) }'; then break; fi
    sleep 0.2
done
if [ -n "$up" ]; then
    pass serve-start
    echo "HWKVM OUT serve: /v1/health answered $(awk -v a="$serve_t0" -v b="$(uptime_s)" 'BEGIN { printf "%.1f", b - a }') s after start"
else
    fail serve-start "kvmfork serve did not report both templates ready within 120 s (alive: $(kill -0 "$server" 2>/dev/null && echo yes || echo no); health: $(head -c 300 "$W/health.body" 2>/dev/null))"
    show "$W/serve.log" 25
fi

if [ -n "$up" ]; then
    if grep -q '"python"' "$W/health.body" && grep -q '"node"' "$W/health.body"; then
        pass serve-health
    else
        fail serve-health "/v1/health does not list both languages: $(head -c 300 "$W/health.body")"
    fi

    AUTH="Authorization: Bearer $KEY"
    http exec POST /v1/exec '{"code": "print(1 + 1)"}' --header "$AUTH"
    if expect_status serve-exec exec 200; then
        if grep -qF '"stdout":"2\n"' "$W/exec.body" && grep -qF '"exit_code":0' "$W/exec.body"; then
            pass serve-exec
        else
            fail serve-exec "200 without stdout 2 / exit_code 0: $(head -c 300 "$W/exec.body")"
        fi
    fi

    http batch POST /v1/exec/batch \
        '{"executions": [{"code": "print(40 + 1)"}, {"code": "console.log(40 + 2)", "language": "node"}, {"code": "import sys; sys.exit(3)"}]}' \
        --header "$AUTH"
    if expect_status serve-batch batch 200; then
        # Results in request order: 41, then 42, then exit code 3.
        order=$(grep -oE '"stdout":"4[12]\\n"|"exit_code":[0-9]+' "$W/batch.body" | tr '\n' ' ')
        if [ "$order" = '"stdout":"41\n" "exit_code":0 "stdout":"42\n" "exit_code":0 "exit_code":3 ' ]; then
            pass serve-batch
        else
            fail serve-batch "unexpected results (wanted 41, 42, exit 3 in order): $(head -c 400 "$W/batch.body")"
        fi
    fi

    http noauth POST /v1/exec '{"code": "print(1)"}'
    expect_status serve-unauthorized noauth 401 && pass serve-unauthorized

    http malformed POST /v1/exec '{"code": "print(1)"' --header "$AUTH"
    expect_status serve-malformed malformed 400 && pass serve-malformed

    # --- hardware-path isolation, seen from a tenant (SECURITY.md) ---------
    # The CPUID trim: no virtualization, no PMU in the tenant's view.
    http cpuinfo POST /v1/exec '{"code": "print([l for l in open(\"/proc/cpuinfo\") if l.startswith(\"flags\")][0])"}' --header "$AUTH"
    if expect_status tenant-cpuid-flags cpuinfo 200; then
        # stdout is JSON-escaped: "flags\t\t: fpu ... last\n".
        flags=$(grep -o '"stdout":"flags[^"]*' "$W/cpuinfo.body" | cut -d: -f3- | sed 's/\\n$//')
        echo "HWKVM OUT tenant flags:$flags"
        bad=$(echo "$flags" | tr ' ' '\n' | grep -xE 'vmx|svm|pdcm|arch_perfmon|perfctr_core|perfctr_nb|perfctr_llc|ibs|lwp|monitor|ds_cpl|dtes64|est|tm2|smx' | tr '\n' ' ')
        if ! echo "$flags" | grep -qw fpu; then
            fail tenant-cpuid-flags "no flags line with fpu in the tenant's /proc/cpuinfo: $(head -c 300 "$W/cpuinfo.body")"
        elif [ -n "$bad" ]; then
            fail tenant-cpuid-flags "the tenant sees CPU flags the hardware CPUID trim must hide: $bad"
        else
            pass tenant-cpuid-flags
        fi
    fi
    # vmrun / vmxon from the tenant fault (a crash result or an exception,
    # never "4242"), and the next exec on the same server works.
    for insn in vmrun:0x0f,0x01,0xd8 vmxon:0xf3,0x0f,0xc7,0x30; do
        name=${insn%%:*}
        code="import ctypes, mmap\nm = mmap.mmap(-1, 4096, prot=7)\nm.write(bytes([${insn#*:}, 0xc3]))\nctypes.CFUNCTYPE(None)(ctypes.addressof(ctypes.c_char.from_buffer(m)))()\nprint(4242)"
        http "$name" POST /v1/exec "{\"code\": \"$code\"}" --header "$AUTH"
        http "$name-after" POST /v1/exec '{"code": "print(40 + 2)"}' --header "$AUTH"
        if expect_status "tenant-$name-faults" "$name" 200; then
            echo "HWKVM OUT $name: $(grep -oE '"exit_code":-?[0-9]+|"code":"[a-z_]+"' "$W/$name.body" | tr '\n' ' ')"
            if grep -qF '4242' "$W/$name.body"; then
                fail "tenant-$name-faults" "$name ran without a fault: $(head -c 300 "$W/$name.body")"
            elif grep -qF '"exit_code":0' "$W/$name.body"; then
                fail "tenant-$name-faults" "exit code 0 after $name: $(head -c 300 "$W/$name.body")"
            elif ! grep -qF '"stdout":"42\n"' "$W/$name-after.body"; then
                fail "tenant-$name-faults" "the next exec after $name failed: HTTP $(status "$name-after") $(head -c 300 "$W/$name-after.body")"
            else
                pass "tenant-$name-faults"
            fi
        fi
    done
    # perf_event_open (syscall 298) of a hardware counter fails; a software
    # event is tried too, to show the syscall itself exists.
    http perf POST /v1/exec '{"code": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\ndef po(t):\n    a = (ctypes.c_uint32 * 32)()\n    a[0] = t\n    a[1] = 64\n    return (libc.syscall(298, a, 0, -1, -1, 0), ctypes.get_errno())\nprint(\"hw\", po(0), \"sw\", po(1))"}' --header "$AUTH"
    if expect_status tenant-perf-denied perf 200; then
        got=$(grep -o '"stdout":"[^"]*' "$W/perf.body" | cut -d'"' -f4)
        echo "HWKVM OUT perf_event_open (fd, errno): $got"
        case $got in
            "hw (-1, "*) pass tenant-perf-denied ;;
            *) fail tenant-perf-denied "perf_event_open of a hardware counter did not fail: $(head -c 300 "$W/perf.body")" ;;
        esac
    fi

    # A live session: state between execs, live fork (children map the
    # session's layer over the template), checkpoint and rollback.
    sid=
    http screate POST /v1/sandboxes '{"language": "python"}' --header "$AUTH"
    if expect_status serve-session screate 201; then
        sid=$(grep -o '"sandbox_id":"[^"]*"' "$W/screate.body" | head -n 1 | cut -d'"' -f4)
        http sx1 POST "/v1/sandboxes/$sid/exec" '{"code": "import numpy as np\nx = 41\na = np.arange(1 << 20)"}' --header "$AUTH"
        http sx2 POST "/v1/sandboxes/$sid/exec" '{"code": "x + 1"}' --header "$AUTH"
        if [ "$(status sx1)" = 200 ] && grep -qF '"result":{"text":"42",' "$W/sx2.body"; then
            pass serve-session
        else
            fail serve-session "state did not persist (wanted result 42): $(head -c 300 "$W/sx1.body") / $(head -c 300 "$W/sx2.body")"
            sid=
        fi
    fi
    if [ -n "$sid" ]; then
        http sfork POST "/v1/sandboxes/$sid/fork" '{"count": 2}' --header "$AUTH"
        kids=$(grep -o '"sandbox_id":"[^"]*"' "$W/sfork.body" | cut -d'"' -f4)
        good=0
        n=0
        for k in $kids; do
            n=$((n + 1))
            http "kid$n" POST "/v1/sandboxes/$k/exec" "{\"code\": \"x = x * 10 + $n\\nint(a[-1]) + x\"}" --header "$AUTH"
            want=$((1048575 + 410 + n))
            grep -qF "\"result\":{\"text\":\"$want\"," "$W/kid$n.body" && good=$((good + 1))
        done
        http sx3 POST "/v1/sandboxes/$sid/exec" '{"code": "x"}' --header "$AUTH"
        if [ "$(status sfork)" = 201 ] && [ "$good" = 2 ] && grep -qF '"result":{"text":"41",' "$W/sx3.body"; then
            pass serve-session-fork
            echo "HWKVM OUT session fork: $(grep -o '"pause_ms":[0-9.]*' "$W/sfork.body")"
        else
            fail serve-session-fork "fork HTTP $(status sfork), $good of 2 children diverged correctly, parent: $(head -c 200 "$W/sx3.body"); fork: $(head -c 300 "$W/sfork.body")"
        fi
        http sckpt POST "/v1/sandboxes/$sid/checkpoints" '' --header "$AUTH"
        cid=$(grep -o '"checkpoint_id":"[^"]*"' "$W/sckpt.body" | cut -d'"' -f4)
        http sx4 POST "/v1/sandboxes/$sid/exec" '{"code": "x = 0\na[-1] = 0"}' --header "$AUTH"
        http srest POST "/v1/sandboxes/$sid/restore" "{\"checkpoint_id\": \"$cid\"}" --header "$AUTH"
        http sx5 POST "/v1/sandboxes/$sid/exec" '{"code": "int(a[-1]) + x"}' --header "$AUTH"
        if [ -n "$cid" ] && [ "$(status srest)" = 200 ] && grep -qF '"result":{"text":"1048616",' "$W/sx5.body"; then
            pass serve-session-restore
        else
            fail serve-session-restore "checkpoint $(head -c 200 "$W/sckpt.body"); restore HTTP $(status srest) $(head -c 200 "$W/srest.body"); after: $(head -c 200 "$W/sx5.body")"
        fi
    else
        fail serve-session-fork "skipped: no session"
        fail serve-session-restore "skipped: no session"
    fi

    items=
    for i in $(seq 1 20); do items="$items${items:+, }{\"code\": \"$RAND_CODE\"}"; done
    http rand POST /v1/exec/batch "{\"executions\": [$items]}" --header "$AUTH"
    if expect_status run-urandom rand 200; then
        grep -oE '"stdout":"[^"]*"' "$W/rand.body" | sed 's/^"stdout":"//; s/\\n"$//' >>"$W/rand.all"
        total=$(wc -l <"$W/rand.all")
        distinct=$(sort -u "$W/rand.all" | wc -l)
        wellformed=$(grep -cxE '[0-9a-f]{16}' "$W/rand.all")
        if [ "$total" -ne 21 ] || [ "$wellformed" -ne 21 ] || [ "$distinct" -ne 21 ]; then
            fail run-urandom "wanted 21 distinct 16-hex-digit values (1 kvmfork run + 20 batch forks), got $total values, $wellformed well-formed, $distinct distinct"
            show "$W/rand.all" 21
        else
            pass run-urandom
        fi
    fi

    http metrics GET /v1/metrics ''
    if expect_status serve-metrics metrics 200; then
        missing=
        for m in kvmfork_http_requests_total kvmfork_pool_forks_total kvmfork_fork_seconds_count kvmfork_io_backend_info; do
            grep -q "^$m" "$W/metrics.body" || missing="$missing $m"
        done
        if [ -z "$missing" ]; then
            pass serve-metrics
            grep '^kvmfork_io_backend_info' "$W/metrics.body" | while IFS= read -r line; do echo "HWKVM OUT $line"; done
        else
            fail serve-metrics "/v1/metrics lacks:$missing"
        fi
    fi
else
    for c in serve-health serve-exec serve-batch serve-unauthorized serve-malformed \
        tenant-cpuid-flags tenant-vmrun-faults tenant-vmxon-faults tenant-perf-denied serve-session \
        serve-session-fork serve-session-restore run-urandom serve-metrics; do
        fail "$c" "skipped: the server did not start"
    done
fi

# SIGTERM drains and exits; bounded wait.
kill -TERM "$server" 2>/dev/null
i=0
while kill -0 "$server" 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
if kill -0 "$server" 2>/dev/null; then
    kill -KILL "$server"
    fail serve-stop "kvmfork serve still running 30 s after SIGTERM"
else
    rc=0
    wait "$server" || rc=$?
    if [ "$rc" -eq 0 ]; then pass serve-stop; else fail serve-stop "kvmfork serve exited with $rc after SIGTERM"; show "$W/serve.log"; fi
fi
msr_denials "$W/serve.log" serve
phase serve

# --- kvmfork bench fork ----------------------------------------------------------
# bench_fork <out> <err> <args...>: `kvmfork bench fork` with a deadline. Twice
# in ~12 nested runs a bench fork here made no progress at all (QEMU busy, no
# output) until the whole suite's timeout; that hang is not understood yet
# (not seen on PVM). So a run that passes BENCH_DEADLINE is killed, reported
# (HWKVM OUT WARNING with its stderr), and retried once; a second hang fails.
BENCH_DEADLINE=120
bench_fork() {
    local out=$1 err=$2 attempt rc
    shift 2
    for attempt in 1 2; do
        rc=0
        timeout -s KILL "$BENCH_DEADLINE" kvmfork bench fork "$@" >"$out" 2>"$err" || rc=$?
        [ "$rc" -ne 137 ] && return "$rc"
        echo "HWKVM OUT WARNING: kvmfork bench fork $* made no progress in ${BENCH_DEADLINE} s (attempt $attempt, killed); its stderr:"
        tail -n 5 "$err" | while IFS= read -r line; do echo "HWKVM OUT   $line"; done
    done
    return "$rc"
}
rc=0
bench_fork "$W/bench.out" "$W/bench.err" --iterations 10 --alive 1,5 --max-exec-alive 5 || rc=$?
while IFS= read -r line; do echo "HWKVM OUT bench: $line"; done <"$W/bench.out"
if [ "$rc" -eq 0 ] && grep -q 'p50' "$W/bench.out"; then
    pass bench-fork
else
    fail bench-fork "exit $rc, or no p50 in its output"
    show "$W/bench.err"
fi
phase bench

# --- the TLB test (tests/vmm_tlb_remap.rs) -------------------------------------
# tlb_check <check>: the one test of the shipped binary, exactly.
tlb_check() {
    local rc=0
    /kvmfork/bin/vmm_tlb_remap --exact pooled_reset_drops_translations_of_a_page_the_guest_remapped \
        --test-threads 1 >"$W/$1.out" 2>&1 || rc=$?
    if [ "$rc" -eq 0 ] && grep -q 'test result: ok. 1 passed' "$W/$1.out"; then
        pass "$1"
    else
        fail "$1" "vmm_tlb_remap exited $rc"
        show "$W/$1.out" 25
    fi
}
tlb_check tlb-remap
phase tlb

# --- shadow paging: kvm_amd reloaded with npt=0 ----------------------------------
# The same hardware-style KVM without nested paging: KVM shadows the guest's
# page tables, as on PVM. kvmfork must detect it (HostCaps: shadow paging)
# and resets must still drop every stale translation. The templates built
# above are reused (same host kind, same CPUID).
npt0_ok=
if rmmod kvm_amd 2>"$W/rmmod.err" && insmod /kvmfork/modules/kvm-amd.ko npt=0 2>"$W/insmod-npt0.err"; then
    # devtmpfs creates /dev/kvm asynchronously after the module registers it.
    i=0
    while [ ! -c /dev/kvm ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    # (A bool parameter in Debian's 6.1: it reads N.)
    case $(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null) in 0 | N) [ -c /dev/kvm ] && npt0_ok=1 ;; esac
fi
dmesg | grep -E 'SVM|kvm' | tail -n 3 | while IFS= read -r line; do echo "HWKVM OUT npt=0 dmesg: $line"; done
if [ -n "$npt0_ok" ]; then
    pass npt0-reload
    run_cmd npt0-run-print 'print(1+1)' &
    p1=$!
    run_cmd npt0-run-numpy 'import numpy as np; print(np.arange(10).mean())' &
    p2=$!
    wait "$p1" "$p2"
    expect_out npt0-run-print 2
    expect_out npt0-run-numpy 4.5
    rc=0
    bench_fork "$W/bench-npt0.out" "$W/bench-npt0.err" --iterations 5 --alive 1 --max-exec-alive 1 || rc=$?
    while IFS= read -r line; do echo "HWKVM OUT bench npt=0: $line"; done <"$W/bench-npt0.out"
    # bench prints the host capabilities kvmfork decided (HostCaps).
    if grep -q '^host: KVM kind hardware, shadow paging' "$W/bench-npt0.out"; then
        pass npt0-host-caps
    else
        fail npt0-host-caps "kvmfork did not report shadow paging with npt=0: $(grep '^host:' "$W/bench-npt0.out" | head -n 1)"
    fi
    if [ "$rc" -eq 0 ] && grep -q 'p50' "$W/bench-npt0.out"; then
        pass npt0-bench-fork
    else
        fail npt0-bench-fork "exit $rc, or no p50 in its output"
        show "$W/bench-npt0.err"
    fi
    tlb_check npt0-tlb-remap
else
    fail npt0-reload "reloading kvm_amd with npt=0 failed: $(cat "$W/rmmod.err" "$W/insmod-npt0.err" 2>/dev/null) (npt=$(cat /sys/module/kvm_amd/parameters/npt 2>&1), /dev/kvm: $(ls -l /dev/kvm 2>&1))"
    for c in npt0-run-print npt0-run-numpy npt0-host-caps npt0-bench-fork npt0-tlb-remap; do
        fail "$c" "skipped: no npt=0 KVM"
    done
fi
phase npt0

finish
