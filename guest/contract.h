/*
 * kvmfork guest <-> host contract: the ONE place that defines guest-physical
 * addresses, the mailbox layout, doorbell values and status codes.
 *
 * Used by the guest agent (C, #include) and by the VMM (Rust: build.rs turns
 * every `#define KVMFORK_* <integer>` line below into a `pub const` in
 * `kvmfork::contract`). Keep every definition on one line of the form
 *     #define KVMFORK_NAME <integer literal>   comment
 * (decimal or 0x hex, no expressions) so both sides read the same numbers.
 *
 * Protocol, in one paragraph: the VMM reserves the mailbox in the guest's e820
 * map and tells the guest where it is on the kernel command line
 * (`kvmfork.mailbox=<addr>`). The agent maps the mailbox and the doorbell page
 * from /dev/mem. Every "ring" is a single aligned 32-bit user-mode store of a
 * KVMFORK_DOORBELL_* value to the doorbell page; the page is outside every KVM
 * memslot, so the store exits to the VMM as KVM_EXIT_MMIO without entering the
 * guest kernel. The agent rings READY once it is fully warm; the template
 * snapshot is taken at that exit. A fork resumes right after that store and
 * finds a request the host wrote into the mailbox; the agent runs it, writes
 * the response and rings DONE. Nothing the guest writes is trusted by the host:
 * every length is bounds-checked against the caps below.
 */
#ifndef KVMFORK_CONTRACT_H
#define KVMFORK_CONTRACT_H

#define KVMFORK_ABI_VERSION 1

/* ---- guest-physical addresses ---- */
#define KVMFORK_MAILBOX_GPA 0x08000000          /* 128 MiB; inside RAM, e820-reserved */
#define KVMFORK_MAILBOX_SIZE 0x00400000         /* 4 MiB */
#define KVMFORK_DOORBELL_GPA 0xd0000000         /* one MMIO page, outside every memslot */
#define KVMFORK_DOORBELL_SIZE 0x1000

/* ---- mailbox header (offsets from KVMFORK_MAILBOX_GPA), all little-endian ---- */
#define KVMFORK_MB_MAGIC_OFF 0x000              /* u64, agent writes KVMFORK_MB_MAGIC when mapped */
#define KVMFORK_MB_MAGIC 0x314b524f464d564b     /* "KVMFORK1" */
#define KVMFORK_MB_ABI_OFF 0x008                /* u32, agent writes KVMFORK_ABI_VERSION */
#define KVMFORK_MB_AGENT_STATE_OFF 0x00c        /* u32, KVMFORK_STATE_* (agent writes) */

/* boot-time entropy: host writes before boot; agent feeds it to RNDADDENTROPY */
#define KVMFORK_MB_BOOT_SEED_OFF 0x010          /* 64 bytes */
#define KVMFORK_MB_SEED_LEN 64

/* agent writes at boot: user-mode address of its interrupt entry (0 = none).
 * To interrupt a session's run without entering the guest kernel, the host
 * stops the vCPU while it is at CPL 3, skips the 128-byte red zone, pushes
 * the interrupted RIP on the user stack and sets RIP to this address; the
 * entry saves every register, asks the runtime to raise KeyboardInterrupt at
 * its next safe point, restores everything and returns with `ret $128`. */
#define KVMFORK_MB_INTERRUPT_ENTRY_OFF 0x050  /* u64 */
#define KVMFORK_INTERRUPT_RED_ZONE 128

/* request: host writes, agent reads */
#define KVMFORK_MB_REQ_SEQ_OFF 0x080            /* u64, host increments per request */
#define KVMFORK_MB_REQ_LANGUAGE_OFF 0x088       /* u32, KVMFORK_LANG_* */
#define KVMFORK_MB_REQ_FLAGS_OFF 0x08c          /* u32, KVMFORK_REQ_FLAG_* */
#define KVMFORK_MB_REQ_TIMEOUT_MS_OFF 0x090     /* u32, informational (the VMM enforces it) */
#define KVMFORK_MB_REQ_CODE_LEN_OFF 0x094       /* u32, bytes of UTF-8 code at KVMFORK_MB_CODE_OFF */
#define KVMFORK_MB_REQ_STDOUT_CAP_OFF 0x098     /* u32, agent writes at most this many stdout bytes */
#define KVMFORK_MB_REQ_STDERR_CAP_OFF 0x09c     /* u32, likewise for stderr */
#define KVMFORK_MB_FORK_GENERATION_OFF 0x0a0    /* u64, host writes a new value per fork (kernel CRNG hook reads it) */
#define KVMFORK_MB_FORK_SEED_OFF 0x0c0          /* 64 bytes of per-fork host randomness */

/* response: agent writes, host reads (and never trusts) */
#define KVMFORK_MB_RESP_SEQ_OFF 0x100           /* u64, echo of the request seq */
#define KVMFORK_MB_RESP_STATUS_OFF 0x108        /* u32, KVMFORK_STATUS_* */
#define KVMFORK_MB_RESP_EXIT_CODE_OFF 0x10c     /* i32, python -c semantics */
#define KVMFORK_MB_RESP_STDOUT_LEN_OFF 0x110    /* u32 */
#define KVMFORK_MB_RESP_STDERR_LEN_OFF 0x114    /* u32 */
#define KVMFORK_MB_RESP_FLAGS_OFF 0x118         /* u32, KVMFORK_RESP_FLAG_* */
#define KVMFORK_MB_RESP_RESULT_LEN_OFF 0x11c    /* u32, bytes of UTF-8 text at KVMFORK_MB_RESULT_OFF */
#define KVMFORK_MB_RESP_EXEC_NS_OFF 0x120       /* u64, agent-measured run time of the code */

/* data areas */
#define KVMFORK_MB_CODE_OFF 0x001000
#define KVMFORK_MB_CODE_MAX 0x100000            /* 1 MiB of code */
#define KVMFORK_MB_STDOUT_OFF 0x101000
#define KVMFORK_MB_STDOUT_MAX 0x100000          /* 1 MiB */
#define KVMFORK_MB_STDERR_OFF 0x201000
#define KVMFORK_MB_STDERR_MAX 0x100000          /* 1 MiB */
#define KVMFORK_MB_RESULT_OFF 0x301000          /* repr of a session run's final expression */
#define KVMFORK_MB_RESULT_MAX 0x40000           /* 256 KiB */

/* ---- doorbell values (u32 stored at KVMFORK_DOORBELL_GPA) ---- */
#define KVMFORK_DOORBELL_READY 0x52454459       /* "YDER": agent warm; snapshot point */
#define KVMFORK_DOORBELL_DONE 0x454e4f44        /* "DONE": response written */
#define KVMFORK_DOORBELL_FATAL 0x4c544146       /* "FATL": agent cannot go on; message in stderr area, length in RESP_STDERR_LEN */

/* ---- agent states ---- */
#define KVMFORK_STATE_BOOTING 1
#define KVMFORK_STATE_READY 2
#define KVMFORK_STATE_RUNNING 3
#define KVMFORK_STATE_DONE 4

/* ---- languages ---- */
#define KVMFORK_LANG_PYTHON 1
#define KVMFORK_LANG_NODE 2

/* ---- response status ---- */
#define KVMFORK_STATUS_OK 0                     /* code ran; exit_code is meaningful */
#define KVMFORK_STATUS_BAD_REQUEST 1            /* bad language / length; message in stderr */
#define KVMFORK_STATUS_AGENT_ERROR 2            /* agent-internal failure; message in stderr */

/* ---- response flags ---- */
#define KVMFORK_RESP_FLAG_STDOUT_TRUNCATED 1
#define KVMFORK_RESP_FLAG_STDERR_TRUNCATED 2
#define KVMFORK_RESP_FLAG_HAS_RESULT 4         /* the run ended with an expression whose value is not None/undefined */
#define KVMFORK_RESP_FLAG_RESULT_TRUNCATED 8
#define KVMFORK_RESP_FLAG_INTERRUPTED 16       /* the run was stopped by the host's interrupt (KeyboardInterrupt) */

/* ---- request flags ---- */
#define KVMFORK_REQ_FLAG_SESSION 1             /* keep the namespace of earlier runs in this VM (globals, imports) and report the final expression's value */
#define KVMFORK_REQ_FLAG_RESEED 2              /* reseed user-space RNGs from the fork seed: set on every stateless run and on a session's first run after create, fork or restore */

#endif /* KVMFORK_CONTRACT_H */
