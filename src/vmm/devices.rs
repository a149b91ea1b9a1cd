//! The guest's legacy devices: a 16550 UART on COM1 (console), the i8042
//! reset line, and quiet answers for ports Linux probes at boot.

use std::collections::VecDeque;
use std::io::Write;

use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
const I8042_DATA: u16 = 0x60;
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET_CMD: u8 = 0xfe;
const CMOS_INDEX: u16 = 0x70;
const CMOS_DATA: u16 = 0x71;

/// Raises the serial IRQ through an irqfd registered with KVM.
pub struct IrqFdTrigger(pub EventFd);

impl Trigger for IrqFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), std::io::Error> {
        self.0.write(1)
    }
}

/// Where console bytes go: a bounded in-memory tail (for error messages),
/// optionally echoed to stderr and appended to a log file.
pub struct ConsoleSink {
    tail: VecDeque<u8>,
    tail_cap: usize,
    echo: bool,
    log: Option<std::fs::File>,
    line: Vec<u8>,
    total: u64,
}

impl ConsoleSink {
    pub fn new(tail_cap: usize, echo: bool, log: Option<std::fs::File>) -> Self {
        ConsoleSink {
            tail: VecDeque::with_capacity(tail_cap),
            tail_cap,
            echo,
            log,
            line: Vec::new(),
            total: 0,
        }
    }

    /// The last bytes the guest printed, lossily decoded.
    pub fn tail_text(&self, max_lines: usize) -> String {
        let bytes: Vec<u8> = self.tail.iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes).replace('\r', "");
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(max_lines);
        lines[start..].join("\n")
    }

    pub fn total_bytes(&self) -> u64 {
        self.total
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.total += buf.len() as u64;
        for &b in buf {
            if self.tail.len() == self.tail_cap {
                self.tail.pop_front();
            }
            self.tail.push_back(b);
        }
        if let Some(log) = self.log.as_mut() {
            let _ = log.write_all(buf);
        }
        if self.echo {
            for &b in buf {
                self.line.push(b);
                if b == b'\n' {
                    let mut err = std::io::stderr().lock();
                    let _ = err.write_all(b"  | ");
                    let _ = err.write_all(&self.line);
                    self.line.clear();
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a port access asked the VMM to do.
#[derive(Debug, PartialEq, Eq)]
pub enum PortAction {
    Continue,
    /// The guest asked for a reset (i8042 pulse) — Linux's reboot / panic path.
    Reset,
}

/// Port I/O devices of one VM.
pub struct LegacyDevices {
    pub serial: Serial<IrqFdTrigger, vm_superio::serial::NoEvents, ConsoleSink>,
    cmos_index: u8,
}

impl LegacyDevices {
    pub fn new(irq: EventFd, sink: ConsoleSink) -> Self {
        LegacyDevices {
            serial: Serial::new(IrqFdTrigger(irq), sink),
            cmos_index: 0,
        }
    }

    /// Restores the UART registers the guest driver programmed (so a fork's
    /// console keeps working exactly as in the template).
    pub fn with_serial_state(irq: EventFd, sink: ConsoleSink, state: &SerialState) -> Self {
        let serial =
            Serial::from_state(state, IrqFdTrigger(irq), vm_superio::serial::NoEvents, sink)
                .unwrap_or_else(|_| panic!("serial state from a validated snapshot"));
        LegacyDevices {
            serial,
            cmos_index: 0,
        }
    }

    /// Back to the template's UART registers with an empty console, so
    /// nothing one user printed reaches the next user of a pooled VM.
    pub fn reset_to(&mut self, state: &SerialState) -> Result<(), std::io::Error> {
        let irq = self.serial.interrupt_evt().0.try_clone()?;
        let (cap, echo) = (self.console().tail_cap, self.console().echo);
        *self = LegacyDevices::with_serial_state(irq, ConsoleSink::new(cap, echo, None), state);
        Ok(())
    }

    pub fn console(&self) -> &ConsoleSink {
        self.serial.writer()
    }

    pub fn pio_write(&mut self, port: u16, data: &[u8]) -> PortAction {
        let Some(&value) = data.first() else {
            return PortAction::Continue;
        };
        match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                // A failed IRQ injection only loses an interrupt; the driver polls.
                let _ = self.serial.write((p - COM1_BASE) as u8, value);
            }
            I8042_COMMAND if value == I8042_RESET_CMD => return PortAction::Reset,
            CMOS_INDEX => self.cmos_index = value & 0x7f,
            _ => {}
        }
        PortAction::Continue
    }

    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        let value = match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => self.serial.read((p - COM1_BASE) as u8),
            // No keyboard controller data; status "output buffer empty".
            I8042_DATA | I8042_COMMAND => 0,
            // A CMOS that is never mid-update and reads zero.
            CMOS_DATA => {
                let _ = self.cmos_index;
                0
            }
            // Nothing else is there: floating bus.
            _ => 0xff,
        };
        data.fill(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_output_reaches_the_console_tail_and_reset_is_detected() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = LegacyDevices::new(irq, ConsoleSink::new(64, false, None));
        for b in b"hello\nworld\n" {
            assert_eq!(dev.pio_write(COM1_BASE, &[*b]), PortAction::Continue);
        }
        assert_eq!(dev.console().tail_text(1), "world");
        assert_eq!(
            dev.pio_write(I8042_COMMAND, &[I8042_RESET_CMD]),
            PortAction::Reset
        );
        let mut buf = [0u8; 1];
        dev.pio_read(0x1234, &mut buf);
        assert_eq!(buf[0], 0xff);
    }

    #[test]
    fn console_tail_is_bounded() {
        let mut sink = ConsoleSink::new(8, false, None);
        sink.write_all(b"0123456789abcdef").unwrap();
        assert_eq!(sink.tail_text(10), "89abcdef");
        assert_eq!(sink.total_bytes(), 16);
    }
}
