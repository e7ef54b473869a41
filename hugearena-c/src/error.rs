//! Status codes, the thread-local error message, and the guard every
//! exported function runs its body in (no Rust panic crosses into C).

use std::cell::RefCell;
use std::ffi::{CString, c_char, c_int};
use std::panic::{AssertUnwindSafe, catch_unwind};

use hugearena::Error;

/// Success.
pub const HUGEARENA_OK: c_int = 0;
/// An argument is invalid: a NULL pointer, a bad option, a size or
/// alignment the call cannot take.
pub const HUGEARENA_E_INVALID_ARGUMENT: c_int = 1;
/// The huge page pool cannot back the region (the message names the
/// command that reserves enough pages).
pub const HUGEARENA_E_HUGE_PAGES: c_int = 2;
/// The kernel lacks what the call needs (a backend, a userfaultfd feature,
/// a file system); the message says what and how to get it.
pub const HUGEARENA_E_UNSUPPORTED: c_int = 3;
/// userfaultfd is denied to this process (the message names the sysctl or
/// capability).
pub const HUGEARENA_E_PERMISSION: c_int = 4;
/// A named region or file does not exist.
pub const HUGEARENA_E_NOT_FOUND: c_int = 5;
/// A region of that name exists already.
pub const HUGEARENA_E_EXISTS: c_int = 6;
/// A region, arena or snapshot file is damaged, truncated, of another
/// version, or not what it was opened as.
pub const HUGEARENA_E_CORRUPT: c_int = 7;
/// The arena has no free memory for the request.
pub const HUGEARENA_E_OUT_OF_MEMORY: c_int = 8;
/// A pointer given back is not a live allocation of this arena (a double
/// free, a bogus or foreign pointer), or is out of bounds.
pub const HUGEARENA_E_INVALID_POINTER: c_int = 9;
/// A system call or the page source failed.
pub const HUGEARENA_E_IO: c_int = 10;
/// An internal error (a Rust panic caught at the boundary): a bug.
pub const HUGEARENA_E_INTERNAL: c_int = 11;

/// A failed call: its status code and what to tell the caller.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) code: c_int,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn invalid(message: impl Into<String>) -> Failure {
        Failure {
            code: HUGEARENA_E_INVALID_ARGUMENT,
            message: message.into(),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure {
            code: status_of(&e),
            message: e.to_string(),
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Failure {
        let code = match e.kind() {
            std::io::ErrorKind::NotFound => HUGEARENA_E_NOT_FOUND,
            std::io::ErrorKind::PermissionDenied => HUGEARENA_E_PERMISSION,
            _ => HUGEARENA_E_IO,
        };
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

/// The status code of a library error.
fn status_of(e: &Error) -> c_int {
    match e {
        Error::ZeroSize { .. }
        | Error::SizeNotGranuleMultiple { .. }
        | Error::SizeTooLarge { .. }
        | Error::InvalidOption { .. }
        | Error::ZeroAllocation
        | Error::Misaligned { .. }
        | Error::AlignmentTooLarge { .. }
        | Error::ReadOnlySource
        | Error::PartialHugePage { .. } => HUGEARENA_E_INVALID_ARGUMENT,
        Error::HugePagesShort { .. } | Error::HgmUnavailable { .. } => HUGEARENA_E_HUGE_PAGES,
        Error::FeatureMissing { .. }
        | Error::BackendUnavailable { .. }
        | Error::UserfaultfdUnsupported { .. }
        | Error::WrongFileSystem { .. } => HUGEARENA_E_UNSUPPORTED,
        Error::UserfaultfdDenied { .. } => HUGEARENA_E_PERMISSION,
        Error::NotFound { .. } => HUGEARENA_E_NOT_FOUND,
        Error::AlreadyExists { .. } => HUGEARENA_E_EXISTS,
        Error::Truncated { .. }
        | Error::BadMagic { .. }
        | Error::UnsupportedVersion { .. }
        | Error::NotReady { .. }
        | Error::CorruptHeader { .. }
        | Error::BadSnapshot { .. }
        | Error::NotAnArena { .. } => HUGEARENA_E_CORRUPT,
        Error::ArenaExhausted { .. } => HUGEARENA_E_OUT_OF_MEMORY,
        Error::InvalidFree { .. }
        | Error::InvalidPointer { .. }
        | Error::ForeignPointer { .. }
        | Error::OutOfBounds { .. } => HUGEARENA_E_INVALID_POINTER,
        _ => HUGEARENA_E_IO,
    }
}

thread_local! {
    static LAST_ERROR: RefCell<(c_int, CString)> = RefCell::new((HUGEARENA_OK, CString::default()));
}

fn set_last_error(code: c_int, message: &str) {
    // An interior NUL would cut the message short; nothing the library
    // writes has one, but a path given by the caller might.
    let text = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = (code, text));
}

/// Runs `body` for the exported function `op`: its failure becomes a status
/// code and this thread's last error; a panic becomes
/// [`HUGEARENA_E_INTERNAL`].
pub(crate) fn guard(op: &str, body: impl FnOnce() -> Result<(), Failure>) -> c_int {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => HUGEARENA_OK,
        Ok(Err(f)) => {
            set_last_error(f.code, &format!("{op}: {}", f.message));
            f.code
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_string());
            set_last_error(
                HUGEARENA_E_INTERNAL,
                &format!(
                    "{op}: internal error ({what}); this is a bug in hugearena, please report it"
                ),
            );
            HUGEARENA_E_INTERNAL
        }
    }
}

/// The message of the last call that failed on this thread: what went
/// wrong and how to fix it, prefixed with the function's name. An empty
/// string if none has failed. The text stays valid until the next failing
/// call on this thread; copy it to keep it.
#[unsafe(no_mangle)]
pub extern "C" fn hugearena_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().1.as_ptr())
}

/// The status code of the last call that failed on this thread
/// ([`HUGEARENA_OK`] if none has).
#[unsafe(no_mangle)]
pub extern "C" fn hugearena_last_error_code() -> c_int {
    LAST_ERROR.with(|e| e.borrow().0)
}

/// The name of a status code (`"HUGEARENA_E_OUT_OF_MEMORY"`), or
/// `"HUGEARENA_E_UNKNOWN"`. A static string.
#[unsafe(no_mangle)]
pub extern "C" fn hugearena_status_name(code: c_int) -> *const c_char {
    let name: &'static [u8] = match code {
        HUGEARENA_OK => b"HUGEARENA_OK\0",
        HUGEARENA_E_INVALID_ARGUMENT => b"HUGEARENA_E_INVALID_ARGUMENT\0",
        HUGEARENA_E_HUGE_PAGES => b"HUGEARENA_E_HUGE_PAGES\0",
        HUGEARENA_E_UNSUPPORTED => b"HUGEARENA_E_UNSUPPORTED\0",
        HUGEARENA_E_PERMISSION => b"HUGEARENA_E_PERMISSION\0",
        HUGEARENA_E_NOT_FOUND => b"HUGEARENA_E_NOT_FOUND\0",
        HUGEARENA_E_EXISTS => b"HUGEARENA_E_EXISTS\0",
        HUGEARENA_E_CORRUPT => b"HUGEARENA_E_CORRUPT\0",
        HUGEARENA_E_OUT_OF_MEMORY => b"HUGEARENA_E_OUT_OF_MEMORY\0",
        HUGEARENA_E_INVALID_POINTER => b"HUGEARENA_E_INVALID_POINTER\0",
        HUGEARENA_E_IO => b"HUGEARENA_E_IO\0",
        HUGEARENA_E_INTERNAL => b"HUGEARENA_E_INTERNAL\0",
        _ => b"HUGEARENA_E_UNKNOWN\0",
    };
    name.as_ptr().cast()
}
