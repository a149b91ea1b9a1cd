//! Templates: building one (kernel + rootfs + boot to the agent's READY
//! doorbell + snapshot), loading one for forking, and describing one.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::Kvm;
use sha2::{Digest, Sha256};
use vmm_sys_util::eventfd::EventFd;

use crate::api::{CancelToken, ExecRequest, Language};
use crate::contract as c;
use crate::engine::sandbox::{fill_random, Limits, Sandbox};
use crate::vmm::boot;
use crate::vmm::cpuid::{self, HostKind};
use crate::vmm::devices::{ConsoleSink, LegacyDevices, COM1_IRQ};
use crate::vmm::host::{HostCaps, TimerHandling};
use crate::vmm::kick::ThreadTimer;
use crate::vmm::memory::{GuestRam, Sharing};
use crate::vmm::snapshot::{self, ArtifactInfo, MachineState, TemplateMeta};
use crate::vmm::vcpu::{RunOutcome, Vcpu};
use crate::vmm::vm::Vm;

/// Bump when the boot path changes in a way that changes the snapshot.
const BOOT_PROTOCOL_VERSION: u32 = 1;
pub const STATE_FILE: &str = "state.snap";
pub const MEMORY_FILE: &str = "memory.bin";
pub const CONSOLE_FILE: &str = "console.log";

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{0}")]
    Script(String),
    #[error("opening /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    Kvm(kvm_ioctls::Error),
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error(transparent)]
    Boot(#[from] crate::vmm::boot::BootError),
    #[error(transparent)]
    Vm(#[from] crate::vmm::vm::VmError),
    #[error(transparent)]
    Vcpu(#[from] crate::vmm::vcpu::VcpuError),
    #[error(transparent)]
    Memory(#[from] crate::vmm::memory::MemoryError),
    #[error(transparent)]
    Snapshot(#[from] crate::vmm::snapshot::SnapshotError),
    #[error(transparent)]
    Kick(#[from] crate::vmm::kick::KickError),
    #[error(transparent)]
    Sandbox(#[from] crate::engine::sandbox::SandboxError),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("guest did not become ready within {secs} s; last console lines:\n{tail}")]
    BootTimeout { secs: u64, tail: String },
    #[error("guest died during boot: {why}; last console lines:\n{tail}")]
    BootCrashed { why: String, tail: String },
    #[error("guest agent reported a fatal error during boot: {0}")]
    AgentFatal(String),
    #[error("template self-check failed: {0}")]
    SelfCheck(String),
    #[error("template was built on a {found} host, this host is {here}: rebuild it here")]
    WrongHost { found: String, here: String },
    #[error("no template for {0}: build one with `kvmfork template build --language {0}`")]
    Missing(String),
}

/// A loaded template, ready to be forked.
pub struct Template {
    pub dir: PathBuf,
    pub meta: TemplateMeta,
    pub state: MachineState,
    /// Sealed memfd holding the template's RAM; forks map it privately.
    pub memfd: File,
    /// Read-only view of the same RAM: the source of copy-back resets.
    pub source: GuestRam,
    /// LAPIC a fork starts with (timer masked: see `VcpuState::lapic_timer_masked`).
    pub fork_lapic: kvm_lapic_state,
    /// What the host can do (`HostCaps::current`, possibly narrowed by the
    /// start-up self-check). Public so tests can give a template the other
    /// host kind's answers and exercise both reset paths on either host.
    pub caps: HostCaps,
}

impl Template {
    pub fn load(dir: &Path) -> Result<Template, TemplateError> {
        let (meta, state) = snapshot::read_state(&dir.join(STATE_FILE))?;
        let here = HostCaps::current().kind;
        if meta.host_kind != here {
            return Err(TemplateError::WrongHost {
                found: meta.host_kind.as_str().into(),
                here: here.as_str().into(),
            });
        }
        let (vendor, _) = cpu_identity();
        if meta.cpu_vendor != vendor {
            return Err(TemplateError::WrongHost {
                found: meta.cpu_vendor.clone(),
                here: vendor,
            });
        }
        let memfd = snapshot::load_memory(&dir.join(&meta.memory.file), &meta.memory)?;
        let mut t = Template::from_parts(dir.to_path_buf(), meta, state, memfd)?;
        if t.caps.counters_see_kernel_entry {
            let code = kernel_probe_code(t.language().unwrap_or(Language::Python));
            match t.verify_user_mode_probe(code) {
                Ok(()) => {}
                Err(why) => eprintln!(
                    "kvmfork: {}: the registers-and-FPU-only reset is off: {why}",
                    t.dir.display()
                ),
            }
        }
        Ok(t)
    }

    /// Verifies the premise of the registers-and-FPU-only reset
    /// (`caps.counters_see_kernel_entry`): runs `code`, which must enter the
    /// guest kernel, in a pooled fork and checks that the exit counters saw
    /// it. If they did not (or the probe could not run), the premise is
    /// cleared for this template, so every exec counts as kernel-entering
    /// (full reset, memory slot cycled), and the reason is returned.
    pub fn verify_user_mode_probe(&mut self, code: &str) -> Result<(), String> {
        let verdict = self.run_probe(code);
        if verdict.is_err() {
            self.caps.counters_see_kernel_entry = false;
            self.caps
                .why
                .push("start-up probe: counters did not see a syscall".into());
        }
        verdict
    }

    fn run_probe(&self, code: &str) -> Result<(), String> {
        let kvm = Kvm::new().map_err(|e| format!("opening /dev/kvm: {e}"))?;
        let timer = ThreadTimer::for_current_thread().map_err(|e| e.to_string())?;
        let mut sb = Sandbox::fork_fresh(&kvm, self, true).map_err(|e| e.to_string())?;
        let language = self.language().unwrap_or(Language::Python);
        let req = |code: &str| ExecRequest {
            code: code.into(),
            language,
            timeout: Duration::from_secs(60),
            cancel: CancelToken::new(),
        };
        // A fresh VM's first exec always counts as kernel-entering (its
        // first run takes exits a reset one does not): the probe runs on a
        // VM that ran once and was reset, as a pooled exec does.
        let warm = match language {
            Language::Python => "pass",
            Language::Node => "0",
        };
        let r = sb.exec(self, &req(warm), &Limits::default(), &timer);
        if let Some(f) = &r.failure {
            crate::vmm::kick::set_current_run(std::ptr::null_mut());
            return Err(format!("the warm-up exec before the probe failed: {f:?}"));
        }
        sb.reset(self)
            .map_err(|e| format!("resetting before the probe: {e}"))?;
        let r = sb.exec(self, &req(code), &Limits::default(), &timer);
        // The sandbox goes away below: the kick handler must not keep its kvm_run.
        crate::vmm::kick::set_current_run(std::ptr::null_mut());
        if let Some(f) = &r.failure {
            return Err(format!("the probe {code:?} failed: {f:?}"));
        }
        if !sb.kernel_entered() {
            return Err(format!(
                "the probe {code:?} makes a syscall, but KVM's exit counters did not see the guest kernel run"
            ));
        }
        Ok(())
    }

    /// Assembles a template from a machine state and the memfd holding its
    /// RAM (sealed here). Used by `load` and by tests with tiny guests.
    pub fn from_parts(
        dir: PathBuf,
        meta: TemplateMeta,
        state: MachineState,
        memfd: File,
    ) -> Result<Template, TemplateError> {
        GuestRam::seal(&memfd)?;
        let source = GuestRam::map(&memfd, meta.ram_size as usize, Sharing::ReadOnly)?;
        let caps = HostCaps::current().clone();
        let fork_lapic = match caps.timer {
            TimerHandling::Template => state.vcpu.lapic,
            TimerHandling::MaskedUntilKick => state.vcpu.lapic_timer_masked(),
        };
        Ok(Template {
            dir,
            meta,
            state,
            memfd,
            source,
            fork_lapic,
            caps,
        })
    }

    pub fn language(&self) -> Option<Language> {
        Language::from_wire(&self.meta.language)
    }
}

/// Code that enters the guest kernel (one syscall) for the start-up probe.
pub fn kernel_probe_code(language: Language) -> &'static str {
    match language {
        Language::Python => "import os; os.getppid()",
        Language::Node => "require('fs').statSync('/')",
    }
}

/// Options of `kvmfork template build`.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub language: Language,
    pub out: Option<PathBuf>,
    pub ram_mib: u64,
    pub verbose: bool,
    pub boot_timeout: Duration,
    pub rebuild: bool,
    /// Use this vmlinux instead of building guest/kernel (development).
    pub kernel: Option<PathBuf>,
    /// Use this initramfs instead of building guest/rootfs (development).
    pub initrd: Option<PathBuf>,
}

/// The `guest/` directory with the kernel and rootfs recipes.
pub fn guest_dir() -> PathBuf {
    crate::settings::var_os("GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/guest")))
}

/// Where kernels, root filesystems and templates are cached.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = crate::settings::var_os("CACHE_DIR") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/kvmfork")
}

struct Progress {
    start: Instant,
}

impl Progress {
    fn say(&self, stage: &str, msg: &str) {
        eprintln!(
            "[{:>7.1}s] {stage}: {msg}",
            self.start.elapsed().as_secs_f64()
        );
    }
}

/// Runs a cached build script; its last stdout line is the output directory.
fn run_script(
    p: &Progress,
    stage: &str,
    script: &Path,
    args: &[&str],
) -> Result<PathBuf, TemplateError> {
    p.say(
        stage,
        &format!("bash {} {}", script.display(), args.join(" ")),
    );
    let out = Command::new("bash")
        .arg(script)
        .args(args)
        // The scripts read only the new name; this also carries a deprecated
        // FORKD_CACHE_DIR (resolved by `cache_dir`) through to them.
        .env(crate::settings::full_name("CACHE_DIR"), cache_dir())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| TemplateError::Io(script.display().to_string(), e))?;
    if !out.status.success() {
        return Err(TemplateError::Script(format!(
            "{} failed with {}",
            script.display(),
            out.status
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string();
    let dir = PathBuf::from(dir);
    if !dir.is_dir() {
        return Err(TemplateError::Script(format!(
            "{} did not print an output directory (got {:?})",
            script.display(),
            dir
        )));
    }
    Ok(dir)
}

fn read_words(path: &Path) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The kernel command line for a host with `caps`.
pub fn kernel_cmdline(caps: &HostCaps) -> String {
    let kdir = guest_dir().join("kernel");
    let mut words = vec![read_words(&kdir.join("cmdline.base"))];
    if caps.pvm_cmdline {
        words.push(read_words(&kdir.join("cmdline.pvm")));
    }
    words.push(format!("kvmfork.mailbox={:#x}", c::MAILBOX_GPA));
    // Development: try extra kernel parameters without editing guest/kernel.
    if let Some(extra) = crate::settings::var("EXTRA_CMDLINE") {
        words.push(extra);
    }
    words.retain(|w| !w.is_empty());
    words.join(" ")
}

/// CPU vendor string and model name of this host.
pub fn cpu_identity() -> (String, String) {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    (field("vendor_id"), field("model name"))
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn dir_key(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Builds (or finds in the cache) the template for `opts.language`.
/// Returns the template directory.
pub fn build(opts: &BuildOptions) -> Result<PathBuf, TemplateError> {
    let p = Progress {
        start: Instant::now(),
    };
    let caps = HostCaps::current();
    let host = caps.kind;
    p.say("host", &format!("KVM kind: {}", host.as_str()));
    p.say("host", &caps.describe());
    let gdir = guest_dir();
    let (kernel_dir, kernel) = match &opts.kernel {
        Some(k) => (
            k.parent().map(Path::to_path_buf).unwrap_or_default(),
            k.clone(),
        ),
        None => {
            let d = run_script(&p, "kernel", &gdir.join("kernel/build.sh"), &[])?;
            let k = d.join("vmlinux");
            (d, k)
        }
    };
    let (rootfs_dir, initrd) = match &opts.initrd {
        Some(i) => (
            i.parent().map(Path::to_path_buf).unwrap_or_default(),
            i.clone(),
        ),
        None => {
            let d = run_script(
                &p,
                "rootfs",
                &gdir.join("rootfs/build.sh"),
                &["--language", opts.language.as_str()],
            )?;
            let i = d.join("initramfs.cpio");
            (d, i)
        }
    };
    let cmdline = kernel_cmdline(caps);
    let ram_size = opts.ram_mib << 20;

    let mut h = Sha256::new();
    for part in [
        dir_key(&kernel_dir),
        dir_key(&rootfs_dir),
        format!("{}:{}", kernel.display(), file_size(&kernel)),
        format!("{}:{}", initrd.display(), file_size(&initrd)),
        cmdline.clone(),
        ram_size.to_string(),
        snapshot::FORMAT_VERSION.to_string(),
        BOOT_PROTOCOL_VERSION.to_string(),
        caps.template_key(),
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    let key: String = h
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    let dir = opts.out.clone().unwrap_or_else(|| {
        cache_dir()
            .join("templates")
            .join(format!("{}-{key}", opts.language.as_str()))
    });
    if !opts.rebuild
        && dir.join(STATE_FILE).is_file()
        && snapshot::read_state(&dir.join(STATE_FILE)).is_ok()
    {
        p.say("template", &format!("cached: {}", dir.display()));
        return Ok(dir);
    }
    let tmp = dir.with_file_name(format!(
        "{}.tmp-{}",
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| TemplateError::Io(tmp.display().to_string(), e))?;

    p.say(
        "boot",
        &format!("{} MiB RAM, cmdline: {cmdline}", opts.ram_mib),
    );
    let packages = read_packages(&rootfs_dir.join("manifest.json"));
    let (meta, machine, ram) =
        boot_to_ready(&p, opts, caps, &kernel, &initrd, &cmdline, ram_size, &tmp)?;
    p.say("snapshot", "writing memory (sparse) and machine state");
    let memory = snapshot::write_memory(&tmp.join(MEMORY_FILE), &ram)?;
    drop(ram);
    let (vendor, model) = cpu_identity();
    let meta = TemplateMeta {
        language: opts.language.as_str().into(),
        kvmfork_version: env!("CARGO_PKG_VERSION").into(),
        host_kind: host,
        cpu_vendor: vendor,
        cpu_model: model,
        ram_size,
        cmdline: cmdline.clone(),
        kernel: ArtifactInfo {
            path: kernel.display().to_string(),
            cache_key: dir_key(&kernel_dir),
            size: file_size(&kernel),
        },
        rootfs: ArtifactInfo {
            path: initrd.display().to_string(),
            cache_key: dir_key(&rootfs_dir),
            size: file_size(&initrd),
        },
        packages,
        memory,
        ..meta
    };
    snapshot::write_state(&tmp.join(STATE_FILE), &meta, &machine)?;
    p.say(
        "snapshot",
        &format!(
            "memory {} MiB apparent, {:.1} MiB allocated ({} non-zero pages)",
            meta.memory.apparent_size >> 20,
            meta.memory.allocated_size as f64 / (1 << 20) as f64,
            meta.memory.nonzero_pages
        ),
    );

    p.say(
        "verify",
        &format!(
            "restoring the snapshot into a fresh VM and running {} through the mailbox",
            opts.language.as_str()
        ),
    );
    self_check(&p, &tmp)?;

    if dir.exists() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| TemplateError::Io(parent.display().to_string(), e))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| TemplateError::Io(dir.display().to_string(), e))?;
    p.say("done", &format!("template ready: {}", dir.display()));
    Ok(dir)
}

fn read_packages(manifest: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(manifest) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Vec::new();
    };
    match v.get("packages") {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|p| match p {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Object(o) => format!(
                    "{}={}",
                    o.get("name").and_then(|x| x.as_str()).unwrap_or("?"),
                    o.get("version").and_then(|x| x.as_str()).unwrap_or("?")
                ),
                other => other.to_string(),
            })
            .collect(),
        Some(serde_json::Value::Object(o)) => o
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(&v.to_string())))
            .collect(),
        _ => Vec::new(),
    }
}

#[allow(clippy::too_many_arguments)]
fn boot_to_ready(
    p: &Progress,
    opts: &BuildOptions,
    caps: &HostCaps,
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    ram_size: u64,
    out: &Path,
) -> Result<(TemplateMeta, MachineState, GuestRam), TemplateError> {
    let kvm = Kvm::new().map_err(TemplateError::Kvm)?;
    let memfd = GuestRam::create_memfd("kvmfork-template-boot", ram_size as usize)?;
    let ram = GuestRam::map(&memfd, ram_size as usize, Sharing::Shared)?;
    let mut seed = [0u8; c::MB_SEED_LEN as usize];
    fill_random(&mut seed);
    ram.write(c::MAILBOX_GPA + c::MB_BOOT_SEED_OFF, &seed)?;
    let loaded = boot::load_linux(&ram, kernel, Some(initrd), cmdline)?;
    p.say(
        "boot",
        &format!(
            "kernel entry {:#x}, initrd {} MiB at {:#x}",
            loaded.entry,
            loaded.initrd_size >> 20,
            loaded.initrd_addr
        ),
    );

    let host = caps.kind;
    let mut vm = Vm::new(&kvm)?;
    if caps.disable_pmu {
        vm.disable_pmu()?;
    }
    if caps.msr_filter {
        vm.enable_msr_filter()?;
    }
    vm.set_ram(&ram, false)?;
    let irq =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| TemplateError::Io("eventfd".into(), e))?;
    vm.register_irqfd(&irq, COM1_IRQ)?;
    let mut cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(TemplateError::SupportedCpuid)?;
    cpuid::filter(&mut cpuid, caps.cpuid);
    let mut vcpu = Vcpu::new(&vm, 0)?;
    vcpu.set_cpuid(&cpuid)?;
    boot::setup_boot_vcpu(&vcpu, loaded.entry)?;
    let log = File::create(out.join(CONSOLE_FILE))
        .map_err(|e| TemplateError::Io(CONSOLE_FILE.into(), e))?;
    let mut devices = LegacyDevices::new(irq, ConsoleSink::new(64 << 10, opts.verbose, Some(log)));

    let timer = ThreadTimer::for_current_thread()?;
    vcpu.bind_kick_to_current_thread();
    let boot_start = Instant::now();
    let mut last_report = Instant::now();
    loop {
        timer.arm(Duration::from_secs(1))?;
        let outcome = vcpu.run(&mut devices, &ram)?;
        match outcome {
            RunOutcome::Doorbell(v) if v as u64 == c::DOORBELL_READY => break,
            RunOutcome::Doorbell(v) if v as u64 == c::DOORBELL_FATAL => {
                return Err(TemplateError::AgentFatal(
                    crate::engine::mailbox::read_fatal_message(&ram),
                ))
            }
            RunOutcome::Doorbell(v) => {
                return Err(TemplateError::BootCrashed {
                    why: format!("unexpected doorbell {v:#x} before READY"),
                    tail: devices.console().tail_text(30),
                })
            }
            RunOutcome::Crashed(why) => {
                return Err(TemplateError::BootCrashed {
                    why,
                    tail: devices.console().tail_text(30),
                })
            }
            RunOutcome::Interrupted => {
                if boot_start.elapsed() > opts.boot_timeout {
                    return Err(TemplateError::BootTimeout {
                        secs: opts.boot_timeout.as_secs(),
                        tail: devices.console().tail_text(30),
                    });
                }
                if !opts.verbose && last_report.elapsed() >= Duration::from_secs(15) {
                    last_report = Instant::now();
                    let last = devices.console().tail_text(1);
                    p.say(
                        "boot",
                        &format!(
                            "guest running {:.0} s; console: {}",
                            boot_start.elapsed().as_secs_f64(),
                            last.trim()
                        ),
                    );
                }
            }
        }
    }
    timer.disarm()?;
    let boot_secs = boot_start.elapsed().as_secs_f64();
    p.say(
        "boot",
        &format!("agent READY after {boot_secs:.1} s of guest run time"),
    );
    // KVM asks for one KVM_RUN with immediate_exit after an MMIO exit so the
    // access completes before state is read.
    vcpu.complete_pending_io()?;
    let vcpu_state = vcpu.save_state(&kvm)?;
    let vm_state = vm.save_state()?;
    let serial = devices.serial.state();
    let cpl = vcpu_state.sregs.cs.dpl;
    if cpl != 3 {
        return Err(TemplateError::BootCrashed {
            why: format!("READY doorbell came from CPL {cpl}, not user mode"),
            tail: devices.console().tail_text(10),
        });
    }
    let meta = TemplateMeta {
        language: String::new(),
        kvmfork_version: String::new(),
        host_kind: host,
        cpu_vendor: String::new(),
        cpu_model: String::new(),
        ram_size,
        cmdline: String::new(),
        kernel: ArtifactInfo {
            path: String::new(),
            cache_key: String::new(),
            size: 0,
        },
        rootfs: ArtifactInfo {
            path: String::new(),
            cache_key: String::new(),
            size: 0,
        },
        packages: Vec::new(),
        boot_to_ready_seconds: boot_secs,
        built_at_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        snapshot_rip: vcpu_state.regs.rip,
        snapshot_cpl: cpl,
        memory: Default::default(),
        xsave_size: std::mem::size_of::<kvm_bindings::kvm_xsave>(),
        pmu_disabled: caps.disable_pmu,
        msr_filtered: caps.msr_filter,
    };
    drop(vcpu);
    drop(vm);
    Ok((
        meta,
        MachineState {
            vcpu: vcpu_state,
            vm: vm_state,
            serial,
        },
        ram,
    ))
}

/// Restores the fresh template into a new VM and checks one round trip in
/// its language: the sum of 0..10^6.
fn self_check(p: &Progress, dir: &Path) -> Result<(), TemplateError> {
    let t = Template::load(dir)?;
    let language = t.language().unwrap_or(Language::Python);
    let code = match language {
        Language::Python => "print(sum(range(10**6)))",
        Language::Node => "let s = 0; for (let i = 0; i < 1e6; i++) s += i; console.log(s)",
    };
    let kvm = Kvm::new().map_err(TemplateError::Kvm)?;
    let timer = ThreadTimer::for_current_thread()?;
    let started = Instant::now();
    let mut sb = Sandbox::fork_fresh(&kvm, &t, false)?;
    let fork = started.elapsed();
    let req = ExecRequest {
        code: code.into(),
        language,
        timeout: Duration::from_secs(120),
        cancel: CancelToken::new(),
    };
    let r = sb.exec(&t, &req, &Limits::default(), &timer);
    let out = String::from_utf8_lossy(&r.stdout);
    if r.failure.is_some() || r.exit_code != 0 || out.trim() != "499999500000" {
        return Err(TemplateError::SelfCheck(format!(
            "{code:?} gave stdout {:?}, stderr {:?}, exit {}, failure {:?}; console:\n{}",
            out,
            String::from_utf8_lossy(&r.stderr),
            r.exit_code,
            r.failure,
            sb.console_tail(20)
        )));
    }
    p.say(
        "verify",
        &format!(
            "ok: 499999500000 (fork {:.0} µs, exec {:.2} ms)",
            fork.as_secs_f64() * 1e6,
            r.exec_time.as_secs_f64() * 1e3
        ),
    );
    Ok(())
}

/// Human-readable description for `kvmfork template inspect`.
pub fn describe(dir: &Path) -> Result<String, TemplateError> {
    let (meta, state) = snapshot::read_state(&dir.join(STATE_FILE))?;
    let mut s = String::new();
    use std::fmt::Write;
    let _ = writeln!(s, "template      {}", dir.display());
    let _ = writeln!(s, "language      {}", meta.language);
    let _ = writeln!(
        s,
        "built         {} (unix), kvmfork {}",
        meta.built_at_unix, meta.kvmfork_version
    );
    let _ = writeln!(
        s,
        "host          {} KVM, {} / {}",
        meta.host_kind.as_str(),
        meta.cpu_vendor,
        meta.cpu_model
    );
    let _ = writeln!(s, "guest RAM     {} MiB", meta.ram_size >> 20);
    let _ = writeln!(
        s,
        "memory file   {} : {} MiB apparent, {:.1} MiB allocated, {} non-zero pages, crc32 {:#010x}",
        meta.memory.file,
        meta.memory.apparent_size >> 20,
        meta.memory.allocated_size as f64 / (1 << 20) as f64,
        meta.memory.nonzero_pages,
        meta.memory.crc32
    );
    let _ = writeln!(
        s,
        "kernel        {} ({} bytes, cache {})",
        meta.kernel.path, meta.kernel.size, meta.kernel.cache_key
    );
    let _ = writeln!(
        s,
        "rootfs        {} ({} bytes, cache {})",
        meta.rootfs.path, meta.rootfs.size, meta.rootfs.cache_key
    );
    let _ = writeln!(s, "cmdline       {}", meta.cmdline);
    let _ = writeln!(s, "boot to ready {:.1} s", meta.boot_to_ready_seconds);
    let _ = writeln!(
        s,
        "snapshot at   RIP {:#x}, CPL {}, {} MSRs, {} CPUID leaves",
        meta.snapshot_rip,
        meta.snapshot_cpl,
        state.vcpu.msrs.len(),
        state.vcpu.cpuid.len()
    );
    match meta.host_kind {
        HostKind::Pvm => {
            let _ = writeln!(
                s,
                "PVM masks     {}",
                cpuid::pvm_hidden_features().join(", ")
            );
        }
        HostKind::Hardware => {
            let _ = writeln!(
                s,
                "CPUID trim    {}",
                cpuid::hardware_hidden_features().join(", ")
            );
        }
    }
    let _ = writeln!(
        s,
        "packages      {}",
        if meta.packages.is_empty() {
            "(not recorded)".into()
        } else {
            meta.packages.join(" ")
        }
    );
    Ok(s)
}

/// Finds the newest cached template for `language`.
pub fn find_cached(language: Language) -> Option<PathBuf> {
    let dir = cache_dir().join("templates");
    let prefix = format!("{}-", language.as_str());
    let mut best: Option<(SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&prefix) || name.contains(".tmp-") {
            continue;
        }
        let state = entry.path().join(STATE_FILE);
        let Ok(m) = std::fs::metadata(&state) else {
            continue;
        };
        let t = m.modified().unwrap_or(UNIX_EPOCH);
        if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
            best = Some((t, entry.path()));
        }
    }
    best.map(|(_, p)| p)
}
