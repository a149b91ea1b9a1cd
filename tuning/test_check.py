"""Tests for tuning/check against a fake /proc + /sys tree (and one smoke run
on the real host). Run: python3 -m unittest discover -s tuning -p 'test_*.py'
"""

import json
import os
import subprocess
import sys
import tempfile
import unittest

CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "check")

UNTUNED = {
    "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages": "0",
    "/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages": "0",
    "/sys/kernel/mm/transparent_hugepage/enabled": "[always] madvise never",
    "/sys/kernel/mm/transparent_hugepage/defrag": "[always] defer defer+madvise madvise never",
    "/sys/kernel/mm/ksm/run": "1",
    "/sys/devices/system/cpu/online": "0-3",
    "/sys/devices/system/cpu/isolated": "",
    "/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor": "powersave",
    "/sys/devices/system/cpu/cpu1/cpufreq/scaling_governor": "performance",
    "/sys/devices/system/cpu/vulnerabilities/itlb_multihit": "KVM: Mitigation: VMX disabled",
    "/proc/sys/net/core/somaxconn": "128",
    "/proc/sys/net/ipv4/tcp_max_syn_backlog": "512",
    "/proc/sys/fs/file-max": "9223372036854775807",
    "/proc/sys/fs/nr_open": "1048576",
    "/proc/sys/vm/max_map_count": "65530",
    "/proc/sys/net/ipv4/ip_local_port_range": "32768\t60999",
    "/proc/sys/net/ipv4/tcp_tw_reuse": "0",
    "/proc/sys/kernel/io_uring_disabled": "2",
    "/proc/sys/kernel/numa_balancing": "1",
    "/proc/irq/5/smp_affinity_list": "0-3",
    "/sys/module/kvm/parameters/halt_poll_ns": "0",
    "/sys/module/kvm/parameters/nx_huge_pages": "N",
    "/sys/module/kvm_intel/parameters/ept": "Y",
    "/dev/kvm": "",  # a regular file: not a usable KVM device
}


def make_root(files):
    root = tempfile.mkdtemp(prefix="tuning-check-")
    for path, content in files.items():
        full = os.path.join(root, path.lstrip("/"))
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as f:
            f.write(content + "\n")
    return root


def run_check(root, *extra):
    proc = subprocess.run([sys.executable, CHECK, "--root", root, "--no-probe", "--json", *extra],
                          capture_output=True, text=True)
    results = {r["name"]: r for r in json.loads(proc.stdout)}
    return proc.returncode, results


def read(root, path):
    with open(os.path.join(root, path.lstrip("/"))) as f:
        return f.read().strip()


class UntunedHost(unittest.TestCase):
    def setUp(self):
        self.root = make_root(UNTUNED)

    def test_reports_every_untuned_setting(self):
        code, results = run_check(self.root)
        expected = {
            "hugepages.2m": "WARN",
            "hugepages.1g": "OK",
            "thp.enabled": "WARN",
            "thp.defrag": "WARN",
            "ksm": "WARN",
            "cpu.governor": "WARN",
            "cpu.isolated": "WARN",
            "irq.affinity": "OK",  # nothing isolated, nothing to keep off
            "sysctl.net.core.somaxconn": "WARN",
            "sysctl.net.ipv4.tcp_max_syn_backlog": "WARN",
            "sysctl.fs.file-max": "OK",
            "sysctl.vm.max_map_count": "WARN",
            "sysctl.net.ipv4.ip_local_port_range": "WARN",
            "sysctl.net.ipv4.tcp_tw_reuse": "WARN",
            "sysctl.kernel.io_uring_disabled": "FAIL",
            "sysctl.kernel.numa_balancing": "WARN",
            "kvm.device": "FAIL",
            "kvm.module": "OK",
            "kvm.halt_poll_ns": "WARN",
            "kvm.ept": "OK",
            "kvm.nx_huge_pages": "FAIL",
        }
        for name, status in expected.items():
            self.assertIn(name, results)
            self.assertEqual(results[name]["status"], status, results[name])
        self.assertEqual(code, 1)
        self.assertEqual(results["cpu.governor"]["current"], "performance,powersave")
        self.assertIn("isolcpus=managed_irq,domain,1-3", results["cpu.isolated"]["recommended"])
        for result in results.values():
            self.assertTrue(result["why"], result)

    def test_nothing_changes_without_apply(self):
        before = {path: read(self.root, path) for path in UNTUNED}
        run_check(self.root)
        after = {path: read(self.root, path) for path in UNTUNED}
        self.assertEqual(before, after)

    def test_apply_fixes_runtime_settings(self):
        code, results = run_check(self.root, "--apply")
        self.assertEqual(read(self.root, "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"), "512")
        self.assertEqual(read(self.root, "/sys/kernel/mm/transparent_hugepage/enabled"), "madvise")
        self.assertEqual(read(self.root, "/sys/kernel/mm/ksm/run"), "0")
        self.assertEqual(read(self.root, "/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"), "performance")
        self.assertEqual(read(self.root, "/proc/sys/net/core/somaxconn"), "4096")
        self.assertEqual(read(self.root, "/proc/sys/net/ipv4/ip_local_port_range"), "10000 65535")
        self.assertEqual(read(self.root, "/proc/sys/kernel/io_uring_disabled"), "0")
        self.assertEqual(read(self.root, "/sys/module/kvm/parameters/halt_poll_ns"), "200000")
        self.assertEqual(read(self.root, "/sys/module/kvm/parameters/nx_huge_pages"), "force")
        # The fake sysfs files hold what was written; the re-check sees them.
        for name in ("hugepages.2m", "thp.enabled", "cpu.governor", "sysctl.net.core.somaxconn",
                     "sysctl.kernel.io_uring_disabled", "kvm.halt_poll_ns"):
            self.assertEqual(results[name]["status"], "OK", results[name])
            self.assertEqual(results[name]["applied"], "ok")
        # Boot-time settings cannot be applied at runtime and stay WARN.
        self.assertEqual(results["cpu.isolated"]["status"], "WARN")
        self.assertIsNone(results["cpu.isolated"]["applied"])
        # /dev/kvm is still not a device: the run still fails.
        self.assertEqual(code, 1)

    def test_sysctl_conf_never_lowers_values(self):
        proc = subprocess.run([sys.executable, CHECK, "--root", self.root, "--sysctl-conf"],
                              capture_output=True, text=True, check=True)
        lines = dict(line.split(" = ", 1) for line in proc.stdout.splitlines() if " = " in line)
        self.assertEqual(lines["fs.file-max"], "9223372036854775807")
        self.assertEqual(lines["net.core.somaxconn"], "4096")
        self.assertEqual(lines["vm.nr_hugepages"], "512")


class IsolatedHost(unittest.TestCase):
    def test_irqs_on_isolated_cores_are_moved(self):
        files = dict(UNTUNED)
        files["/sys/devices/system/cpu/isolated"] = "2-3"
        files["/proc/irq/6/smp_affinity_list"] = "0"
        root = make_root(files)
        _, results = run_check(root)
        self.assertEqual(results["cpu.isolated"]["status"], "OK")
        self.assertEqual(results["irq.affinity"]["status"], "WARN")
        self.assertIn("1 IRQs", results["irq.affinity"]["current"])
        _, results = run_check(root, "--apply")
        self.assertEqual(read(root, "/proc/irq/5/smp_affinity_list"), "0-1")
        self.assertEqual(read(root, "/proc/irq/6/smp_affinity_list"), "0")
        self.assertEqual(results["irq.affinity"]["status"], "OK")


class RealHost(unittest.TestCase):
    def test_every_line_has_a_verdict(self):
        proc = subprocess.run([sys.executable, CHECK], capture_output=True, text=True)
        self.assertIn(proc.returncode, (0, 1), proc.stderr)
        lines = proc.stdout.splitlines()
        self.assertGreater(len(lines), 15)
        for line in lines:
            self.assertRegex(line, r"^(OK|WARN|FAIL) ")


if __name__ == "__main__":
    unittest.main()
