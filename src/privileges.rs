//! `kvmfork serve --user`: giving up root once the listeners are bound, and
//! the refusal to run exec workers as root without `--allow-root`.

use std::ffi::{CStr, CString};

/// A user from the password database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

/// Looks `user` up by name, or by number if it is all digits.
pub fn lookup(user: &str) -> Result<User, String> {
    let mut pwd = std::mem::MaybeUninit::<libc::passwd>::uninit();
    let mut buf = vec![0u8; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let rc = if let Ok(uid) = user.parse::<libc::uid_t>() {
        // SAFETY: every pointer is to a live buffer of the stated size;
        // `result` is set to `pwd` or null.
        unsafe {
            libc::getpwuid_r(
                uid,
                pwd.as_mut_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        }
    } else {
        let name = CString::new(user).map_err(|_| format!("bad user name {user:?}"))?;
        // SAFETY: as above; `name` is a NUL-terminated string that outlives the call.
        unsafe {
            libc::getpwnam_r(
                name.as_ptr(),
                pwd.as_mut_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        }
    };
    if rc != 0 {
        return Err(format!(
            "looking up user {user:?}: {}",
            std::io::Error::from_raw_os_error(rc)
        ));
    }
    if result.is_null() {
        return Err(format!("no user {user:?}"));
    }
    // SAFETY: getpw*_r returned success with `result` == `pwd`: it is
    // initialized, and its strings point into `buf`, which is still alive.
    let pwd = unsafe { pwd.assume_init() };
    // SAFETY: pw_name is a NUL-terminated string in `buf`.
    let name = unsafe { CStr::from_ptr(pwd.pw_name) }
        .to_string_lossy()
        .into_owned();
    Ok(User {
        name,
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    })
}

/// Switches the whole process to `user`: its supplementary groups, group
/// and user id, real, effective and saved, so root cannot be taken back.
/// Call it before threads that install seccomp filters start (glibc applies
/// the change to every thread with a signal those filters would refuse).
pub fn drop_to(user: &User) -> Result<(), String> {
    let name = CString::new(user.name.as_str()).map_err(|_| "bad user name".to_string())?;
    // SAFETY: `name` is NUL-terminated and outlives the call.
    if unsafe { libc::initgroups(name.as_ptr(), user.gid) } != 0 {
        return Err(format!(
            "setting the groups of {}: {}",
            user.name,
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: no memory arguments.
    if unsafe { libc::setresgid(user.gid, user.gid, user.gid) } != 0 {
        return Err(format!(
            "setting group {}: {}",
            user.gid,
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: no memory arguments.
    if unsafe { libc::setresuid(user.uid, user.uid, user.uid) } != 0 {
        return Err(format!(
            "setting user {}: {}",
            user.uid,
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: no arguments.
    let (uid, euid) = unsafe { (libc::getuid(), libc::geteuid()) };
    if uid != user.uid || euid != user.uid {
        return Err(format!(
            "still uid {uid}/{euid} after switching to {}",
            user.uid
        ));
    }
    // A user other than root must not be able to become root again.
    // SAFETY: no memory arguments; success is the failure checked for.
    if user.uid != 0 && unsafe { libc::setuid(0) } == 0 {
        return Err("could switch back to root after dropping privileges".into());
    }
    Ok(())
}

/// Whether the process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: no arguments.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_found_by_name_and_number() {
        let by_name = lookup("root").unwrap();
        assert_eq!((by_name.uid, by_name.gid), (0, 0));
        assert_eq!(lookup("0").unwrap().name, "root");
        assert!(lookup("no-such-user-kvmfork-test").is_err());
    }
}
