/*
 * forkd guest <-> host contract: the ONE place that defines guest-physical
 * addresses, the mailbox layout, doorbell values and status codes.
 *
 * Used by the guest agent (C, #include) and by the VMM (Rust: build.rs turns
 * every `#define FORKD_* <integer>` line below into a `pub const` in
 * `forkd::contract`). Keep every definition on one line of the form
 *     #define FORKD_NAME <integer literal>   comment
 * (decimal or 0x hex, no expressions) so both sides read the same numbers.
 *
 * Protocol, in one paragraph: the VMM reserves the mailbox in the guest's e820
 * map and tells the guest where it is on the kernel command line
 * (`forkd.mailbox=<addr>`). The agent maps the mailbox and the doorbell page
 * from /dev/mem. Every "ring" is a single aligned 32-bit user-mode store of a
 * FORKD_DOORBELL_* value to the doorbell page; the page is outside every KVM
 * memslot, so the store exits to the VMM as KVM_EXIT_MMIO without entering the
 * guest kernel. The agent rings READY once it is fully warm; the template
 * snapshot is taken at that exit. A fork resumes right after that store and
 * finds a request the host wrote into the mailbox; the agent runs it, writes
 * the response and rings DONE. Nothing the guest writes is trusted by the host:
 * every length is bounds-checked against the caps below.
 */
#ifndef FORKD_CONTRACT_H
#define FORKD_CONTRACT_H

#define FORKD_ABI_VERSION 1

/* ---- guest-physical addresses ---- */
#define FORKD_MAILBOX_GPA 0x08000000          /* 128 MiB; inside RAM, e820-reserved */
#define FORKD_MAILBOX_SIZE 0x00400000         /* 4 MiB */
#define FORKD_DOORBELL_GPA 0xd0000000         /* one MMIO page, outside every memslot */
#define FORKD_DOORBELL_SIZE 0x1000

/* ---- mailbox header (offsets from FORKD_MAILBOX_GPA), all little-endian ---- */
#define FORKD_MB_MAGIC_OFF 0x000              /* u64, agent writes FORKD_MB_MAGIC when mapped */
#define FORKD_MB_MAGIC 0x31424d444b524f46     /* "FORKDMB1" */
#define FORKD_MB_ABI_OFF 0x008                /* u32, agent writes FORKD_ABI_VERSION */
#define FORKD_MB_AGENT_STATE_OFF 0x00c        /* u32, FORKD_STATE_* (agent writes) */

/* boot-time entropy: host writes before boot; agent feeds it to RNDADDENTROPY */
#define FORKD_MB_BOOT_SEED_OFF 0x010          /* 64 bytes */
#define FORKD_MB_SEED_LEN 64

/* request: host writes, agent reads */
#define FORKD_MB_REQ_SEQ_OFF 0x080            /* u64, host increments per request */
#define FORKD_MB_REQ_LANGUAGE_OFF 0x088       /* u32, FORKD_LANG_* */
#define FORKD_MB_REQ_FLAGS_OFF 0x08c          /* u32, reserved, 0 */
#define FORKD_MB_REQ_TIMEOUT_MS_OFF 0x090     /* u32, informational (the VMM enforces it) */
#define FORKD_MB_REQ_CODE_LEN_OFF 0x094       /* u32, bytes of UTF-8 code at FORKD_MB_CODE_OFF */
#define FORKD_MB_REQ_STDOUT_CAP_OFF 0x098     /* u32, agent writes at most this many stdout bytes */
#define FORKD_MB_REQ_STDERR_CAP_OFF 0x09c     /* u32, likewise for stderr */
#define FORKD_MB_FORK_GENERATION_OFF 0x0a0    /* u64, host writes a new value per fork (kernel CRNG hook reads it) */
#define FORKD_MB_FORK_SEED_OFF 0x0c0          /* 64 bytes of per-fork host randomness */

/* response: agent writes, host reads (and never trusts) */
#define FORKD_MB_RESP_SEQ_OFF 0x100           /* u64, echo of the request seq */
#define FORKD_MB_RESP_STATUS_OFF 0x108        /* u32, FORKD_STATUS_* */
#define FORKD_MB_RESP_EXIT_CODE_OFF 0x10c     /* i32, python -c semantics */
#define FORKD_MB_RESP_STDOUT_LEN_OFF 0x110    /* u32 */
#define FORKD_MB_RESP_STDERR_LEN_OFF 0x114    /* u32 */
#define FORKD_MB_RESP_FLAGS_OFF 0x118         /* u32, FORKD_RESP_FLAG_* */
#define FORKD_MB_RESP_EXEC_NS_OFF 0x120       /* u64, agent-measured run time of the code */

/* data areas */
#define FORKD_MB_CODE_OFF 0x001000
#define FORKD_MB_CODE_MAX 0x100000            /* 1 MiB of code */
#define FORKD_MB_STDOUT_OFF 0x101000
#define FORKD_MB_STDOUT_MAX 0x100000          /* 1 MiB */
#define FORKD_MB_STDERR_OFF 0x201000
#define FORKD_MB_STDERR_MAX 0x100000          /* 1 MiB */

/* ---- doorbell values (u32 stored at FORKD_DOORBELL_GPA) ---- */
#define FORKD_DOORBELL_READY 0x52454459       /* "YDER": agent warm; snapshot point */
#define FORKD_DOORBELL_DONE 0x454e4f44        /* "DONE": response written */
#define FORKD_DOORBELL_FATAL 0x4c544146       /* "FATL": agent cannot go on; message in stderr area, length in RESP_STDERR_LEN */

/* ---- agent states ---- */
#define FORKD_STATE_BOOTING 1
#define FORKD_STATE_READY 2
#define FORKD_STATE_RUNNING 3
#define FORKD_STATE_DONE 4

/* ---- languages ---- */
#define FORKD_LANG_PYTHON 1
#define FORKD_LANG_NODE 2

/* ---- response status ---- */
#define FORKD_STATUS_OK 0                     /* code ran; exit_code is meaningful */
#define FORKD_STATUS_BAD_REQUEST 1            /* bad language / length; message in stderr */
#define FORKD_STATUS_AGENT_ERROR 2            /* agent-internal failure; message in stderr */

/* ---- response flags ---- */
#define FORKD_RESP_FLAG_STDOUT_TRUNCATED 1
#define FORKD_RESP_FLAG_STDERR_TRUNCATED 2

#endif /* FORKD_CONTRACT_H */
