//! The fork engine: sandboxes forked from a template, pooled per lane.

pub mod lane;
pub mod layer;
pub mod mailbox;
pub mod pool;
pub mod registry;
pub mod sandbox;
pub mod session;

use crate::api::ExecFailure;

/// Stable machine-readable code for a failure (used in API error objects).
pub fn failure_code(f: &ExecFailure) -> &'static str {
    match f {
        ExecFailure::Timeout => "timeout",
        ExecFailure::Cancelled => "cancelled",
        ExecFailure::GuestCrashed(_) => "guest_crashed",
        ExecFailure::BadResponse(_) => "bad_guest_response",
        ExecFailure::MemoryLimit => "memory_limit",
        ExecFailure::Rejected(_) => "rejected",
        ExecFailure::NoTemplate => "no_template",
        ExecFailure::Internal(_) => "internal",
    }
}

/// Human-readable description of a failure.
pub fn describe_failure(f: &ExecFailure) -> String {
    match f {
        ExecFailure::Timeout => "execution timed out; the sandbox was stopped".into(),
        ExecFailure::Cancelled => "execution cancelled".into(),
        ExecFailure::GuestCrashed(why) => format!("sandbox crashed: {why}"),
        ExecFailure::BadResponse(why) => format!("sandbox returned an invalid response: {why}"),
        ExecFailure::MemoryLimit => "sandbox exceeded its memory limit".into(),
        ExecFailure::Rejected(why) => format!("request rejected: {why}"),
        ExecFailure::NoTemplate => "no template is loaded for this language".into(),
        ExecFailure::Internal(why) => format!("internal error: {why}"),
    }
}
