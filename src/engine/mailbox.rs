//! Host side of the mailbox protocol (`guest/contract.h`): writing requests
//! into a sandbox's RAM and decoding the agent's response, trusting nothing
//! the guest wrote.

use crate::contract as c;
use crate::vmm::memory::{GuestRam, MemoryError, PAGE_SIZE};

const MB: u64 = c::MAILBOX_GPA;

/// A request as laid out in the mailbox.
pub struct MailboxRequest<'a> {
    pub seq: u64,
    pub language: u32,
    pub timeout_ms: u32,
    pub code: &'a [u8],
    pub stdout_cap: u32,
    pub stderr_cap: u32,
    pub fork_generation: u64,
    pub fork_seed: [u8; 64],
    /// `KVMFORK_REQ_FLAG_*`.
    pub flags: u32,
}

/// The decoded, validated response.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MailboxResponse {
    pub status: u32,
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// repr of a session run's final expression (UTF-8, validated).
    pub result: Option<String>,
    pub result_truncated: bool,
    /// The run ended because the host interrupted it.
    pub interrupted: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResponseError {
    #[error("response sequence {found} does not answer request {expected}")]
    WrongSequence { found: u64, expected: u64 },
    #[error("agent reported unknown status {0}")]
    UnknownStatus(u32),
    #[error("{area} length {len} exceeds the cap of {cap} bytes")]
    LengthOverCap {
        area: &'static str,
        len: u32,
        cap: u32,
    },
    #[error("guest memory access failed: {0}")]
    Memory(String),
    #[error("the final-expression result is not valid UTF-8")]
    ResultNotUtf8,
}

impl From<MemoryError> for ResponseError {
    fn from(e: MemoryError) -> Self {
        ResponseError::Memory(e.to_string())
    }
}

/// Largest code the mailbox carries.
pub const CODE_MAX: usize = c::MB_CODE_MAX as usize;

/// Writes `req` into the mailbox. Returns the guest page numbers the host
/// wrote (KVM's dirty log does not see host writes; the pool must copy these
/// back on reset).
pub fn write_request(ram: &GuestRam, req: &MailboxRequest) -> Result<Vec<u64>, MemoryError> {
    assert!(req.code.len() <= CODE_MAX, "caller checks the code size");
    ram.write_u64(MB + c::MB_REQ_SEQ_OFF, req.seq)?;
    ram.write_u32(MB + c::MB_REQ_LANGUAGE_OFF, req.language)?;
    ram.write_u32(MB + c::MB_REQ_FLAGS_OFF, req.flags)?;
    ram.write_u32(MB + c::MB_REQ_TIMEOUT_MS_OFF, req.timeout_ms)?;
    ram.write_u32(MB + c::MB_REQ_CODE_LEN_OFF, req.code.len() as u32)?;
    ram.write_u32(
        MB + c::MB_REQ_STDOUT_CAP_OFF,
        req.stdout_cap.min(c::MB_STDOUT_MAX as u32),
    )?;
    ram.write_u32(
        MB + c::MB_REQ_STDERR_CAP_OFF,
        req.stderr_cap.min(c::MB_STDERR_MAX as u32),
    )?;
    ram.write_u64(MB + c::MB_FORK_GENERATION_OFF, req.fork_generation)?;
    ram.write(MB + c::MB_FORK_SEED_OFF, &req.fork_seed)?;
    ram.write(MB + c::MB_CODE_OFF, req.code)?;
    let mut pages = vec![MB / PAGE_SIZE as u64];
    let first = (MB + c::MB_CODE_OFF) / PAGE_SIZE as u64;
    let count = req.code.len().div_ceil(PAGE_SIZE) as u64;
    pages.extend(first..first + count);
    Ok(pages)
}

/// Reads and validates the response to request `seq`. Every length is
/// checked against both the contract maximum and the cap the host asked for.
pub fn read_response(
    ram: &GuestRam,
    seq: u64,
    stdout_cap: u32,
    stderr_cap: u32,
) -> Result<MailboxResponse, ResponseError> {
    let found = ram.read_u64(MB + c::MB_RESP_SEQ_OFF)?;
    if found != seq {
        return Err(ResponseError::WrongSequence {
            found,
            expected: seq,
        });
    }
    let status = ram.read_u32(MB + c::MB_RESP_STATUS_OFF)?;
    if ![c::STATUS_OK, c::STATUS_BAD_REQUEST, c::STATUS_AGENT_ERROR].contains(&(status as u64)) {
        return Err(ResponseError::UnknownStatus(status));
    }
    let exit_code = ram.read_u32(MB + c::MB_RESP_EXIT_CODE_OFF)? as i32;
    let flags = ram.read_u32(MB + c::MB_RESP_FLAGS_OFF)?;
    let stdout = read_area(
        ram,
        "stdout",
        c::MB_RESP_STDOUT_LEN_OFF,
        c::MB_STDOUT_OFF,
        stdout_cap.min(c::MB_STDOUT_MAX as u32),
    )?;
    let stderr = read_area(
        ram,
        "stderr",
        c::MB_RESP_STDERR_LEN_OFF,
        c::MB_STDERR_OFF,
        stderr_cap.min(c::MB_STDERR_MAX as u32),
    )?;
    let result = if flags & c::RESP_FLAG_HAS_RESULT as u32 != 0 {
        let bytes = read_area(
            ram,
            "result",
            c::MB_RESP_RESULT_LEN_OFF,
            c::MB_RESULT_OFF,
            c::MB_RESULT_MAX as u32,
        )?;
        Some(String::from_utf8(bytes).map_err(|_| ResponseError::ResultNotUtf8)?)
    } else {
        None
    };
    Ok(MailboxResponse {
        status,
        exit_code,
        stdout,
        stderr,
        stdout_truncated: flags & c::RESP_FLAG_STDOUT_TRUNCATED as u32 != 0,
        stderr_truncated: flags & c::RESP_FLAG_STDERR_TRUNCATED as u32 != 0,
        result,
        result_truncated: flags & c::RESP_FLAG_RESULT_TRUNCATED as u32 != 0,
        interrupted: flags & c::RESP_FLAG_INTERRUPTED as u32 != 0,
    })
}

/// The user-mode address of the agent's interrupt entry (0: the agent has
/// none and a timed-out session cannot be interrupted, only ended).
pub fn read_interrupt_entry(ram: &GuestRam) -> u64 {
    ram.read_u64(MB + c::MB_INTERRUPT_ENTRY_OFF).unwrap_or(0)
}

fn read_area(
    ram: &GuestRam,
    area: &'static str,
    len_off: u64,
    data_off: u64,
    cap: u32,
) -> Result<Vec<u8>, ResponseError> {
    let len = ram.read_u32(MB + len_off)?;
    if len > cap {
        return Err(ResponseError::LengthOverCap { area, len, cap });
    }
    let mut buf = vec![0u8; len as usize];
    ram.read(MB + data_off, &mut buf)?;
    Ok(buf)
}

/// The message an agent left with a FATAL doorbell (bounded, lossy UTF-8).
pub fn read_fatal_message(ram: &GuestRam) -> String {
    let len = ram
        .read_u32(MB + c::MB_RESP_STDERR_LEN_OFF)
        .unwrap_or(0)
        .min(4096);
    let mut buf = vec![0u8; len as usize];
    let _ = ram.read(MB + c::MB_STDERR_OFF, &mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::memory::Sharing;

    fn ram() -> GuestRam {
        let size = (MB + c::MAILBOX_SIZE) as usize;
        let f = GuestRam::create_memfd("mb", size).unwrap();
        GuestRam::map(&f, size, Sharing::Private).unwrap()
    }

    fn respond(ram: &GuestRam, seq: u64, status: u32, out: &[u8], out_len: u32) {
        ram.write_u64(MB + c::MB_RESP_SEQ_OFF, seq).unwrap();
        ram.write_u32(MB + c::MB_RESP_STATUS_OFF, status).unwrap();
        ram.write_u32(MB + c::MB_RESP_EXIT_CODE_OFF, 3).unwrap();
        ram.write(MB + c::MB_STDOUT_OFF, out).unwrap();
        ram.write_u32(MB + c::MB_RESP_STDOUT_LEN_OFF, out_len)
            .unwrap();
        ram.write_u32(MB + c::MB_RESP_STDERR_LEN_OFF, 0).unwrap();
        ram.write_u32(
            MB + c::MB_RESP_FLAGS_OFF,
            c::RESP_FLAG_STDOUT_TRUNCATED as u32,
        )
        .unwrap();
    }

    #[test]
    fn request_roundtrip_reports_host_written_pages() {
        let ram = ram();
        let code = vec![b'x'; PAGE_SIZE + 10];
        let req = MailboxRequest {
            seq: 9,
            language: 1,
            timeout_ms: 100,
            code: &code,
            stdout_cap: 10,
            stderr_cap: 10,
            fork_generation: 5,
            fork_seed: [7; 64],
            flags: c::REQ_FLAG_SESSION as u32,
        };
        let pages = write_request(&ram, &req).unwrap();
        assert_eq!(pages.len(), 3, "header page + two code pages");
        assert_eq!(
            ram.read_u32(MB + c::MB_REQ_CODE_LEN_OFF).unwrap(),
            code.len() as u32
        );
        respond(&ram, 9, 0, b"hi", 2);
        let resp = read_response(&ram, 9, 10, 10).unwrap();
        assert_eq!(
            (
                resp.stdout.as_slice(),
                resp.exit_code,
                resp.stdout_truncated
            ),
            (&b"hi"[..], 3, true)
        );
    }

    #[test]
    fn hostile_lengths_and_statuses_are_refused() {
        let ram = ram();
        respond(&ram, 1, 0, b"", u32::MAX);
        assert!(matches!(
            read_response(&ram, 1, 10, 10),
            Err(ResponseError::LengthOverCap { .. })
        ));
        respond(&ram, 1, 0, b"", 11);
        assert!(matches!(
            read_response(&ram, 1, 10, 10),
            Err(ResponseError::LengthOverCap { .. })
        ));
        respond(&ram, 1, 77, b"", 0);
        assert_eq!(
            read_response(&ram, 1, 10, 10),
            Err(ResponseError::UnknownStatus(77))
        );
        respond(&ram, 2, 0, b"", 0);
        assert!(matches!(
            read_response(&ram, 1, 10, 10),
            Err(ResponseError::WrongSequence { .. })
        ));
    }

    #[test]
    fn a_final_expression_result_is_read_only_when_flagged_and_validated() {
        let ram = ram();
        respond(&ram, 4, 0, b"", 0);
        ram.write(MB + c::MB_RESULT_OFF, b"'x'").unwrap();
        ram.write_u32(MB + c::MB_RESP_RESULT_LEN_OFF, 3).unwrap();
        assert_eq!(
            read_response(&ram, 4, 10, 10).unwrap().result,
            None,
            "no HAS_RESULT flag"
        );
        let flags = (c::RESP_FLAG_HAS_RESULT | c::RESP_FLAG_INTERRUPTED) as u32;
        ram.write_u32(MB + c::MB_RESP_FLAGS_OFF, flags).unwrap();
        let resp = read_response(&ram, 4, 10, 10).unwrap();
        assert_eq!(resp.result.as_deref(), Some("'x'"));
        assert!(resp.interrupted && !resp.result_truncated);
        ram.write_u32(MB + c::MB_RESP_RESULT_LEN_OFF, c::MB_RESULT_MAX as u32 + 1)
            .unwrap();
        assert!(matches!(
            read_response(&ram, 4, 10, 10),
            Err(ResponseError::LengthOverCap { area: "result", .. })
        ));
        ram.write(MB + c::MB_RESULT_OFF, &[0xff, 0xfe]).unwrap();
        ram.write_u32(MB + c::MB_RESP_RESULT_LEN_OFF, 2).unwrap();
        assert_eq!(
            read_response(&ram, 4, 10, 10),
            Err(ResponseError::ResultNotUtf8)
        );
    }
}
