//! userfaultfd(2): open, API handshake, registration, and the resolving
//! ioctls (`CONTINUE`, `ZEROPAGE`, `WAKE`, `POISON`), plus batched event reads.
//!
//! Request codes are computed with `nix`'s ioctl macros from the kernel's
//! numbers and our `#[repr(C)]` argument structs; a test cross-checks them
//! against `linux-raw-sys`.
#![allow(unsafe_code)] // system calls

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::error::{Errno, SysError, SysResult};

/// The ioctl type byte of userfaultfd (`UFFDIO` and `USERFAULTFD_IOC`).
const UFFDIO_TYPE: u8 = 0xAA;
/// `UFFD_API`: the only API version there is.
pub(crate) const UFFD_API: u64 = 0xAA;
/// `UFFD_USER_MODE_ONLY`: only faults from user mode are reported.
pub(crate) const UFFD_USER_MODE_ONLY: libc::c_int = 1;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct UffdioApi {
    /// Requested API version (`UFFD_API`).
    pub api: u64,
    /// Requested features in, enabled (or, for a zero request, all
    /// supported) features out.
    pub features: u64,
    /// Out: the ioctls the descriptor supports, as `1 << _UFFDIO_*` bits.
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct UffdioRange {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct UffdioRegister {
    /// The range to register.
    pub range: UffdioRange,
    /// `UFFDIO_REGISTER_MODE_*` bits.
    pub mode: u64,
    /// Out: ioctls usable on the range.
    pub ioctls: u64,
}

/// `struct uffdio_continue`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct UffdioContinue {
    /// The range to map from the page cache.
    pub range: UffdioRange,
    /// `UFFDIO_CONTINUE_MODE_*` bits.
    pub mode: u64,
    /// Out: bytes mapped, or a negative errno.
    pub mapped: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct UffdioZeropage {
    /// The range to fill with zeroes and map.
    pub range: UffdioRange,
    /// `UFFDIO_ZEROPAGE_MODE_*` bits.
    pub mode: u64,
    /// Out: bytes zeroed and mapped, or a negative errno.
    pub zeropage: i64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct UffdioCopy {
    /// Where to map the page(s), in the registered range.
    pub dst: u64,
    /// The bytes to copy into the new page(s).
    pub src: u64,
    /// Bytes, a multiple of the page size.
    pub len: u64,
    /// `UFFDIO_COPY_MODE_*` bits.
    pub mode: u64,
    /// Out: bytes copied and mapped, or a negative errno.
    pub copy: i64,
}

/// `struct uffdio_poison`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct UffdioPoison {
    /// The range to poison.
    pub range: UffdioRange,
    /// `UFFDIO_POISON_MODE_*` bits.
    pub mode: u64,
    /// Out: bytes poisoned, or a negative errno.
    pub updated: i64,
}

/// `struct uffd_msg`: one event, as read(2) returns it (32 bytes, packed).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct UffdMsg {
    /// `UFFD_EVENT_*`.
    pub event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    /// The event's union, as three words.
    pub arg: [u64; 3],
}

/// `_IOWR`/`_IOR`/`_IO` request codes, from nix's macros.
pub(crate) mod request {
    use super::*;
    use std::mem::size_of;

    /// The type of an ioctl request code on this target.
    pub(crate) type Request = nix::sys::ioctl::ioctl_num_type;

    /// `UFFDIO_API`.
    pub(crate) const API: Request =
        nix::request_code_readwrite!(UFFDIO_TYPE, 0x3F, size_of::<UffdioApi>());
    /// `UFFDIO_REGISTER`.
    pub(crate) const REGISTER: Request =
        nix::request_code_readwrite!(UFFDIO_TYPE, 0x00, size_of::<UffdioRegister>());
    /// `UFFDIO_WAKE`.
    pub(crate) const WAKE: Request =
        nix::request_code_read!(UFFDIO_TYPE, 0x02, size_of::<UffdioRange>());
    /// `UFFDIO_CONTINUE`.
    pub(crate) const CONTINUE: Request =
        nix::request_code_readwrite!(UFFDIO_TYPE, 0x07, size_of::<UffdioContinue>());
    /// `UFFDIO_ZEROPAGE`.
    pub(crate) const ZEROPAGE: Request =
        nix::request_code_readwrite!(UFFDIO_TYPE, 0x04, size_of::<UffdioZeropage>());
    /// `UFFDIO_COPY`.
    pub(crate) const COPY: Request =
        nix::request_code_readwrite!(UFFDIO_TYPE, 0x03, size_of::<UffdioCopy>());
    /// `UFFDIO_POISON`.
    pub(crate) const POISON: Request =
        nix::request_code_readwrite!(UFFDIO_TYPE, 0x08, size_of::<UffdioPoison>());
    /// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`.
    pub(crate) const IOC_NEW: Request = nix::request_code_none!(UFFDIO_TYPE, 0x00);
}

/// `UFFD_FEATURE_*` bits, as a set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Features(pub u64);

impl Features {
    /// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`.
    pub const PAGEFAULT_FLAG_WP: Features = Features(1 << 0);
    /// `UFFD_FEATURE_EVENT_FORK`.
    pub const EVENT_FORK: Features = Features(1 << 1);
    /// `UFFD_FEATURE_EVENT_REMAP`.
    pub const EVENT_REMAP: Features = Features(1 << 2);
    /// `UFFD_FEATURE_EVENT_REMOVE`.
    pub const EVENT_REMOVE: Features = Features(1 << 3);
    /// `UFFD_FEATURE_MISSING_HUGETLBFS`.
    pub const MISSING_HUGETLBFS: Features = Features(1 << 4);
    /// `UFFD_FEATURE_MISSING_SHMEM`.
    pub const MISSING_SHMEM: Features = Features(1 << 5);
    /// `UFFD_FEATURE_EVENT_UNMAP`.
    pub const EVENT_UNMAP: Features = Features(1 << 6);
    /// `UFFD_FEATURE_SIGBUS`: faults raise SIGBUS instead of an event.
    pub const SIGBUS: Features = Features(1 << 7);
    /// `UFFD_FEATURE_THREAD_ID`.
    pub const THREAD_ID: Features = Features(1 << 8);
    /// `UFFD_FEATURE_MINOR_HUGETLBFS`.
    pub const MINOR_HUGETLBFS: Features = Features(1 << 9);
    /// `UFFD_FEATURE_MINOR_SHMEM`.
    pub const MINOR_SHMEM: Features = Features(1 << 10);
    /// `UFFD_FEATURE_EXACT_ADDRESS`.
    pub const EXACT_ADDRESS: Features = Features(1 << 11);
    /// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`.
    pub const WP_HUGETLBFS_SHMEM: Features = Features(1 << 12);
    /// `UFFD_FEATURE_WP_UNPOPULATED`.
    pub const WP_UNPOPULATED: Features = Features(1 << 13);
    /// `UFFD_FEATURE_POISON`.
    pub const POISON: Features = Features(1 << 14);
    /// `UFFD_FEATURE_WP_ASYNC`.
    pub const WP_ASYNC: Features = Features(1 << 15);
    /// `UFFD_FEATURE_MOVE`.
    pub const MOVE: Features = Features(1 << 16);

    /// Every feature with its kernel name, for reports.
    pub const NAMED: [(Features, &'static str); 17] = [
        (Self::PAGEFAULT_FLAG_WP, "PAGEFAULT_FLAG_WP"),
        (Self::EVENT_FORK, "EVENT_FORK"),
        (Self::EVENT_REMAP, "EVENT_REMAP"),
        (Self::EVENT_REMOVE, "EVENT_REMOVE"),
        (Self::MISSING_HUGETLBFS, "MISSING_HUGETLBFS"),
        (Self::MISSING_SHMEM, "MISSING_SHMEM"),
        (Self::EVENT_UNMAP, "EVENT_UNMAP"),
        (Self::SIGBUS, "SIGBUS"),
        (Self::THREAD_ID, "THREAD_ID"),
        (Self::MINOR_HUGETLBFS, "MINOR_HUGETLBFS"),
        (Self::MINOR_SHMEM, "MINOR_SHMEM"),
        (Self::EXACT_ADDRESS, "EXACT_ADDRESS"),
        (Self::WP_HUGETLBFS_SHMEM, "WP_HUGETLBFS_SHMEM"),
        (Self::WP_UNPOPULATED, "WP_UNPOPULATED"),
        (Self::POISON, "POISON"),
        (Self::WP_ASYNC, "WP_ASYNC"),
        (Self::MOVE, "MOVE"),
    ];

    /// The empty set.
    pub const fn empty() -> Features {
        Features(0)
    }

    /// Whether every bit of `other` is in `self`.
    pub const fn contains(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }

    /// The names of the features in the set.
    pub fn names(self) -> Vec<&'static str> {
        Self::NAMED
            .iter()
            .filter(|(f, _)| self.contains(*f))
            .map(|(_, n)| *n)
            .collect()
    }
}

impl std::ops::BitOr for Features {
    type Output = Features;
    fn bitor(self, rhs: Features) -> Features {
        Features(self.0 | rhs.0)
    }
}

/// `UFFDIO_REGISTER_MODE_*`: which faults in a range are reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RegisterMode(pub u64);

impl RegisterMode {
    /// `UFFDIO_REGISTER_MODE_MISSING`: no page in the page cache.
    pub(crate) const MISSING: RegisterMode = RegisterMode(1 << 0);
    /// `UFFDIO_REGISTER_MODE_WP`: write to a write-protected page.
    pub(crate) const WP: RegisterMode = RegisterMode(1 << 1);
    /// `UFFDIO_REGISTER_MODE_MINOR`: page in the page cache, not mapped here.
    pub(crate) const MINOR: RegisterMode = RegisterMode(1 << 2);

    /// Whether every mode in `other` is in `self`.
    pub(crate) fn contains(self, other: RegisterMode) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for RegisterMode {
    type Output = RegisterMode;
    fn bitor(self, rhs: RegisterMode) -> RegisterMode {
        RegisterMode(self.0 | rhs.0)
    }
}

/// `UFFDIO_COPY_MODE_DONTWAKE` / `UFFDIO_CONTINUE_MODE_DONTWAKE` /
/// `UFFDIO_ZEROPAGE_MODE_DONTWAKE` / `UFFDIO_POISON_MODE_DONTWAKE`: map
/// without waking faulting threads (wake them later with one `WAKE`).
pub(crate) const MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFDIO_CONTINUE_MODE_WP`: map the pages write-protected (Linux 6.4;
/// `1 << 1` in `include/uapi/linux/userfaultfd.h`, which linux-raw-sys
/// 0.12 does not carry).
pub(crate) const CONTINUE_MODE_WP: u64 = 1 << 1;

/// `UFFD_EVENT_*` codes.
pub(crate) mod event {
    /// A page fault.
    pub(crate) const PAGEFAULT: u8 = 0x12;
    /// The process forked (needs `EVENT_FORK`).
    pub(crate) const FORK: u8 = 0x13;
    /// mremap of a registered range.
    pub(crate) const REMAP: u8 = 0x14;
    /// madvise(DONTNEED/REMOVE) of a registered range.
    pub(crate) const REMOVE: u8 = 0x15;
    /// munmap of a registered range.
    pub(crate) const UNMAP: u8 = 0x16;
}

/// A decoded userfaultfd event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// A thread faulted on `address` (rounded down to the fault granule
    /// unless `EXACT_ADDRESS` was requested).
    PageFault {
        /// `UFFD_PAGEFAULT_FLAG_*` bits.
        flags: u64,
        /// The faulting address.
        address: u64,
        /// The faulting thread (with `THREAD_ID`), else 0.
        thread_id: u32,
    },
    /// The process forked; `ufd` is the child's descriptor.
    Fork {
        /// The child's userfaultfd.
        ufd: u32,
    },
    /// A registered range moved.
    Remap {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length.
        len: u64,
    },
    /// Pages in `[start, end)` were zapped by madvise.
    Remove {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// `[start, end)` was unmapped.
    Unmap {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// An event this crate does not know.
    Unknown(u8),
}

impl UffdMsg {
    /// Decodes the message.
    pub(crate) fn decode(&self) -> Event {
        let arg = self.arg;
        match self.event {
            event::PAGEFAULT => Event::PageFault {
                flags: arg[0],
                address: arg[1],
                thread_id: arg[2] as u32,
            },
            event::FORK => Event::Fork { ufd: arg[0] as u32 },
            event::REMAP => Event::Remap {
                from: arg[0],
                to: arg[1],
                len: arg[2],
            },
            event::REMOVE => Event::Remove {
                start: arg[0],
                end: arg[1],
            },
            event::UNMAP => Event::Unmap {
                start: arg[0],
                end: arg[1],
            },
            other => Event::Unknown(other),
        }
    }
}

/// How to create a userfaultfd.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct OpenFlags {
    /// `UFFD_USER_MODE_ONLY`: kernel-mode accesses (e.g. `read(2)` into an
    /// unpopulated page) fail with EFAULT instead of raising an event. Lets
    /// an unprivileged process use the syscall when
    /// `vm.unprivileged_userfaultfd = 0`.
    pub user_mode_only: bool,
    /// `O_NONBLOCK`: `read(2)` returns EAGAIN when no event is pending.
    pub nonblocking: bool,
}

impl OpenFlags {
    fn raw(self) -> libc::c_int {
        let mut flags = libc::O_CLOEXEC;
        if self.nonblocking {
            flags |= libc::O_NONBLOCK;
        }
        if self.user_mode_only {
            flags |= UFFD_USER_MODE_ONLY;
        }
        flags
    }
}

/// How a userfaultfd was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenedThrough {
    /// `/dev/userfaultfd` and `USERFAULTFD_IOC_NEW` (Linux 6.1+).
    Device,
    /// The `userfaultfd(2)` system call.
    Syscall,
}

/// Both ways of opening a userfaultfd failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenError {
    /// Why `/dev/userfaultfd` did not work.
    pub device: SysError,
    /// Why the system call did not work.
    pub syscall: SysError,
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "/dev/userfaultfd: {}; syscall: {}",
            self.device, self.syscall
        )
    }
}

impl std::error::Error for OpenError {}

/// An open userfaultfd.
#[derive(Debug)]
pub(crate) struct Userfaultfd {
    fd: OwnedFd,
}

/// The path of the userfaultfd device node.
pub(crate) const DEVICE_PATH: &str = "/dev/userfaultfd";

impl Userfaultfd {
    /// Opens a userfaultfd through `/dev/userfaultfd`, falling back to the
    /// system call.
    // The error keeps both attempts without allocating; opening is rare.
    #[allow(clippy::result_large_err)]
    pub(crate) fn open(flags: OpenFlags) -> Result<(Userfaultfd, OpenedThrough), OpenError> {
        let device = match Self::open_device(flags) {
            Ok(uffd) => return Ok((uffd, OpenedThrough::Device)),
            Err(e) => e,
        };
        match Self::open_syscall(flags) {
            Ok(uffd) => Ok((uffd, OpenedThrough::Syscall)),
            Err(syscall) => Err(OpenError { device, syscall }),
        }
    }

    /// Opens a userfaultfd through `/dev/userfaultfd` only.
    pub(crate) fn open_device(flags: OpenFlags) -> SysResult<Userfaultfd> {
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open(DEVICE_PATH)
            .map_err(|e| {
                SysError::new(
                    "open(/dev/userfaultfd)",
                    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                )
            })?;
        // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value, not a pointer.
        let fd = unsafe { libc::ioctl(dev.as_raw_fd(), request::IOC_NEW, flags.raw()) };
        if fd < 0 {
            return Err(
                SysError::last("ioctl(USERFAULTFD_IOC_NEW)").arg("flags", flags.raw() as u64)
            );
        }
        // SAFETY: the kernel just returned `fd`, and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Userfaultfd { fd })
    }

    /// Opens a userfaultfd with the `userfaultfd(2)` system call only.
    pub(crate) fn open_syscall(flags: OpenFlags) -> SysResult<Userfaultfd> {
        // SAFETY: userfaultfd(2) takes one integer argument.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags.raw()) };
        if fd < 0 {
            return Err(SysError::last("userfaultfd").arg("flags", flags.raw() as u64));
        }
        // SAFETY: the kernel just returned `fd`, and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        Ok(Userfaultfd { fd })
    }

    /// Makes this descriptor's number refer to `replacement`'s userfaultfd
    /// (`dup3` onto it, close-on-exec), so everything holding this one uses
    /// the replacement from now on. Allocates nothing (a forked child calls
    /// it before it may take locks).
    /// A second descriptor for the same userfaultfd (`F_DUPFD_CLOEXEC`):
    /// its registrations last until both are closed.
    pub(crate) fn duplicate(&self) -> SysResult<OwnedFd> {
        self.fd.try_clone().map_err(|e| {
            let errno = Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
            SysError::new("fcntl(F_DUPFD_CLOEXEC, userfaultfd)", errno)
        })
    }

    pub(crate) fn replace_with(&self, replacement: Userfaultfd) -> SysResult<()> {
        // SAFETY: both descriptors are open and owned; dup3 closes ours and
        // reuses its number atomically, so no other descriptor is affected.
        let ret = unsafe {
            libc::dup3(
                replacement.fd.as_raw_fd(),
                self.fd.as_raw_fd(),
                libc::O_CLOEXEC,
            )
        };
        if ret < 0 {
            return Err(SysError::last("dup3(userfaultfd)"));
        }
        Ok(())
    }

    /// The API handshake (`UFFDIO_API`), which must come first and only once.
    ///
    /// Requesting [`Features::empty`] enables nothing optional and reports
    /// every feature the kernel supports; requesting an unsupported feature
    /// fails with EINVAL.
    pub(crate) fn api(&self, features: Features) -> SysResult<UffdioApi> {
        let mut arg = UffdioApi {
            api: UFFD_API,
            features: features.0,
            ioctls: 0,
        };
        self.ioctl(request::API, &mut arg, "UFFDIO_API")
            .map_err(|e| e.arg("features", features.0))?;
        Ok(arg)
    }

    /// Registers `[start, start + len)` (`UFFDIO_REGISTER`); returns the
    /// ioctls usable on it as `1 << _UFFDIO_*` bits.
    pub(crate) fn register(
        &self,
        start: *mut u8,
        len: usize,
        mode: RegisterMode,
    ) -> SysResult<u64> {
        let mut arg = UffdioRegister {
            range: range(start, len),
            mode: mode.0,
            ioctls: 0,
        };
        self.ioctl(request::REGISTER, &mut arg, "UFFDIO_REGISTER")
            .map_err(|e| {
                e.arg("start", start as u64)
                    .arg("len", len as u64)
                    .arg("mode", mode.0)
            })?;
        Ok(arg.ioctls)
    }

    /// Wakes threads parked on faults in `[start, start + len)` (`UFFDIO_WAKE`).
    pub(crate) fn wake(&self, start: *mut u8, len: usize) -> SysResult<()> {
        let mut arg = range(start, len);
        self.ioctl(request::WAKE, &mut arg, "UFFDIO_WAKE")
            .map_err(|e| e.arg("start", start as u64).arg("len", len as u64))
    }

    /// Maps page-cache pages into `[start, start + len)` of a MINOR-registered
    /// range (`UFFDIO_CONTINUE`); returns the bytes mapped.
    ///
    /// EEXIST (already mapped) and EAGAIN (mappings changed; `mapped` in the
    /// error says how far it got) are normal outcomes under concurrency.
    ///
    /// # Safety
    ///
    /// The range must be registered with this descriptor; the page cache
    /// behind it must hold the bytes readers of the range are meant to see.
    pub(crate) unsafe fn continue_range(
        &self,
        start: *mut u8,
        len: usize,
        mode: u64,
    ) -> Result<usize, RangeError> {
        let mut arg = UffdioContinue {
            range: range(start, len),
            mode,
            mapped: 0,
        };
        let result = self.ioctl(request::CONTINUE, &mut arg, "UFFDIO_CONTINUE");
        done(result, arg.mapped, start, len)
    }

    /// Resolves missing faults on `[start, start + len)` with zeroed pages
    /// (`UFFDIO_ZEROPAGE`): on shmem the kernel allocates each page, zeroes
    /// it, adds it to the file and maps it, in one call. `EEXIST` if a
    /// page is already in the file or mapped. Returns the bytes done.
    ///
    /// # Safety
    ///
    /// The range must be registered with this descriptor for missing
    /// faults, and its pages' content must be zeroes for whoever reads them
    /// (the caller holds the fill of each one).
    pub(crate) unsafe fn zeropage(
        &self,
        start: *mut u8,
        len: usize,
        mode: u64,
    ) -> Result<usize, RangeError> {
        let mut arg = UffdioZeropage {
            range: range(start, len),
            mode,
            zeropage: 0,
        };
        let result = self.ioctl(request::ZEROPAGE, &mut arg, "UFFDIO_ZEROPAGE");
        done(result, arg.zeropage, start, len)
    }

    /// Allocates pages for `[start, start + len)`, copies `len` bytes from
    /// `src` into them and maps them (`UFFDIO_COPY`): a missing fault's
    /// fill and map in one call. Returns the bytes mapped.
    ///
    /// # Safety
    ///
    /// The range must be registered with this descriptor for missing
    /// faults, `src` must be readable for `len` bytes, and the bytes must
    /// be the pages' content for whoever reads them (the caller holds the
    /// fill of each one).
    pub(crate) unsafe fn copy(
        &self,
        start: *mut u8,
        src: *const u8,
        len: usize,
        mode: u64,
    ) -> Result<usize, RangeError> {
        let mut arg = UffdioCopy {
            dst: start as u64,
            src: src as u64,
            len: len as u64,
            mode,
            copy: 0,
        };
        let result = self.ioctl(request::COPY, &mut arg, "UFFDIO_COPY");
        done(result, arg.copy, start, len)
    }

    /// Marks `[start, start + len)` poisoned (`UFFDIO_POISON`): any access
    /// raises SIGBUS until the range is zapped. Returns the bytes poisoned.
    ///
    /// # Safety
    ///
    /// The range must be registered with this descriptor, and no code may
    /// rely on being able to access it.
    pub(crate) unsafe fn poison(
        &self,
        start: *mut u8,
        len: usize,
        mode: u64,
    ) -> Result<usize, RangeError> {
        let mut arg = UffdioPoison {
            range: range(start, len),
            mode,
            updated: 0,
        };
        let result = self.ioctl(request::POISON, &mut arg, "UFFDIO_POISON");
        done(result, arg.updated, start, len)
    }

    /// Reads as many pending events as fit in `buf` with one `read(2)`.
    ///
    /// Returns 0 when the descriptor is non-blocking and nothing is pending.
    pub(crate) fn read_events(&self, buf: &mut [UffdMsg]) -> SysResult<usize> {
        let bytes = std::mem::size_of_val(buf);
        // SAFETY: `buf` is valid for writes of `bytes` bytes, and any bit
        // pattern is a valid `UffdMsg`.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), bytes) };
        if n < 0 {
            let errno = Errno::last();
            if errno == Errno::EAGAIN {
                return Ok(0);
            }
            return Err(SysError::new("read(userfaultfd)", errno).arg("len", bytes as u64));
        }
        Ok(n as usize / std::mem::size_of::<UffdMsg>())
    }

    fn ioctl<T>(&self, request: request::Request, arg: &mut T, op: &'static str) -> SysResult<()> {
        // SAFETY: every request code used with this helper is paired with the
        // struct type it was computed from, which the kernel reads and writes
        // in place.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), request, arg as *mut T) };
        if ret < 0 {
            return Err(SysError::last(op));
        }
        Ok(())
    }
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn range(start: *mut u8, len: usize) -> UffdioRange {
    UffdioRange {
        start: start as u64,
        len: len as u64,
    }
}

/// Folds the "bytes done" out-field into the ioctl's result.
/// A range ioctl that stopped part-way: which, why, and how many bytes it
/// got through first (`EAGAIN` under concurrent mapping changes is a
/// normal outcome: retry the rest). Small, so results carrying it stay
/// cheap on the fault path.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RangeError {
    op: &'static str,
    errno: Errno,
    start: u64,
    len: u64,
    pub(crate) done: usize,
}

impl RangeError {
    pub(crate) fn errno(&self) -> Errno {
        self.errno
    }

    /// The failure as a [`SysError`], for logs and callers.
    pub(crate) fn sys(&self) -> SysError {
        SysError::new(self.op, self.errno)
            .arg("start", self.start)
            .arg("len", self.len)
            .arg("done", self.done as u64)
    }
}

fn done(result: SysResult<()>, out: i64, start: *mut u8, len: usize) -> Result<usize, RangeError> {
    let done = out.max(0) as usize;
    result.map(|()| done).map_err(|e| RangeError {
        op: e.op(),
        errno: e.errno(),
        start: start as u64,
        len: len as u64,
        done,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use linux_raw_sys::general as k;
    use linux_raw_sys::ioctl as kio;
    use std::mem::size_of;

    /// Builds `_IOC(dir, type, nr, size)` the way the kernel headers do.
    fn ioc(dir: u32, nr: u32, size: usize) -> u64 {
        ((dir as u64) << 30) | ((size as u64) << 16) | ((k::UFFDIO as u64) << 8) | nr as u64
    }

    // `Request` is `u64` on x86_64 but not everywhere: keep the casts.
    #[allow(clippy::unnecessary_cast)]
    #[test]
    fn request_codes_match_the_kernel_headers() {
        assert_eq!(request::API as u64, kio::UFFDIO_API as u64);
        assert_eq!(request::REGISTER as u64, kio::UFFDIO_REGISTER as u64);
        assert_eq!(request::WAKE as u64, kio::UFFDIO_WAKE as u64);
        assert_eq!(request::CONTINUE as u64, kio::UFFDIO_CONTINUE as u64);
        assert_eq!(request::ZEROPAGE as u64, kio::UFFDIO_ZEROPAGE as u64);
        assert_eq!(request::COPY as u64, kio::UFFDIO_COPY as u64);
        // linux-raw-sys has no precomputed POISON or IOC_NEW: build them from
        // its own numbers and struct sizes.
        assert_eq!(
            request::POISON as u64,
            ioc(3, k::_UFFDIO_POISON, size_of::<k::uffdio_poison>())
        );
        assert_eq!(request::IOC_NEW as u64, ioc(0, 0, 0));
        assert_eq!(k::USERFAULTFD_IOC, k::UFFDIO);
        assert_eq!(u32::from(UFFDIO_TYPE), k::UFFDIO);
    }

    #[test]
    fn struct_layouts_match_the_kernel_headers() {
        assert_eq!(size_of::<UffdioApi>(), size_of::<k::uffdio_api>());
        assert_eq!(size_of::<UffdioRange>(), size_of::<k::uffdio_range>());
        assert_eq!(size_of::<UffdioRegister>(), size_of::<k::uffdio_register>());
        assert_eq!(size_of::<UffdioContinue>(), size_of::<k::uffdio_continue>());
        assert_eq!(size_of::<UffdioPoison>(), size_of::<k::uffdio_poison>());
        assert_eq!(size_of::<UffdioZeropage>(), size_of::<k::uffdio_zeropage>());
        assert_eq!(size_of::<UffdioCopy>(), size_of::<k::uffdio_copy>());
        assert_eq!(size_of::<UffdMsg>(), size_of::<k::uffd_msg>());
        assert_eq!(size_of::<UffdMsg>(), 32);
    }

    #[test]
    fn constants_match_the_kernel_headers() {
        assert_eq!(UFFD_API, u64::from(k::UFFD_API));
        assert_eq!(UFFD_USER_MODE_ONLY as u32, k::UFFD_USER_MODE_ONLY);
        let features = [
            (
                Features::PAGEFAULT_FLAG_WP,
                k::UFFD_FEATURE_PAGEFAULT_FLAG_WP,
            ),
            (Features::EVENT_FORK, k::UFFD_FEATURE_EVENT_FORK),
            (Features::EVENT_REMAP, k::UFFD_FEATURE_EVENT_REMAP),
            (Features::EVENT_REMOVE, k::UFFD_FEATURE_EVENT_REMOVE),
            (
                Features::MISSING_HUGETLBFS,
                k::UFFD_FEATURE_MISSING_HUGETLBFS,
            ),
            (Features::MISSING_SHMEM, k::UFFD_FEATURE_MISSING_SHMEM),
            (Features::EVENT_UNMAP, k::UFFD_FEATURE_EVENT_UNMAP),
            (Features::SIGBUS, k::UFFD_FEATURE_SIGBUS),
            (Features::THREAD_ID, k::UFFD_FEATURE_THREAD_ID),
            (Features::MINOR_HUGETLBFS, k::UFFD_FEATURE_MINOR_HUGETLBFS),
            (Features::MINOR_SHMEM, k::UFFD_FEATURE_MINOR_SHMEM),
            (Features::EXACT_ADDRESS, k::UFFD_FEATURE_EXACT_ADDRESS),
            (
                Features::WP_HUGETLBFS_SHMEM,
                k::UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
            ),
            (Features::WP_UNPOPULATED, k::UFFD_FEATURE_WP_UNPOPULATED),
            (Features::POISON, k::UFFD_FEATURE_POISON),
            (Features::WP_ASYNC, k::UFFD_FEATURE_WP_ASYNC),
            (Features::MOVE, k::UFFD_FEATURE_MOVE),
        ];
        assert_eq!(features.len(), Features::NAMED.len());
        for (ours, theirs) in features {
            assert_eq!(ours.0, u64::from(theirs));
        }
        assert_eq!(
            RegisterMode::MISSING.0,
            u64::from(k::UFFDIO_REGISTER_MODE_MISSING)
        );
        assert_eq!(RegisterMode::WP.0, u64::from(k::UFFDIO_REGISTER_MODE_WP));
        assert_eq!(
            RegisterMode::MINOR.0,
            u64::from(k::UFFDIO_REGISTER_MODE_MINOR)
        );
        assert_eq!(MODE_DONTWAKE, u64::from(k::UFFDIO_COPY_MODE_DONTWAKE));
        // The CONTINUE and POISON mode bits are declared as
        // anonymous enums in the header, which linux-raw-sys does not export;
        // the header gives them the same values as COPY's.
        assert_eq!(MODE_DONTWAKE, u64::from(k::UFFDIO_ZEROPAGE_MODE_DONTWAKE));
        assert_eq!(CONTINUE_MODE_WP, u64::from(k::UFFDIO_COPY_MODE_WP));

        assert_eq!(event::PAGEFAULT, k::UFFD_EVENT_PAGEFAULT as u8);
        assert_eq!(event::FORK, k::UFFD_EVENT_FORK as u8);
        assert_eq!(event::REMAP, k::UFFD_EVENT_REMAP as u8);
        assert_eq!(event::REMOVE, k::UFFD_EVENT_REMOVE as u8);
        assert_eq!(event::UNMAP, k::UFFD_EVENT_UNMAP as u8);
        assert_eq!(libc::SYS_userfaultfd as u32, k::__NR_userfaultfd);
        assert_eq!(
            crate::sys::mman::Advice::MADV_COLLAPSE as u32,
            k::MADV_COLLAPSE
        );
    }

    #[test]
    fn handshake_reports_minor_fault_support() {
        let (uffd, _) = Userfaultfd::open(OpenFlags::default()).expect("open userfaultfd");
        let api = uffd.api(Features::empty()).unwrap();
        let supported = Features(api.features);
        assert!(
            supported.contains(Features::MINOR_SHMEM),
            "{:?}",
            supported.names()
        );
    }

    #[test]
    fn minor_fault_on_shmem_is_resolved_with_continue() {
        use crate::sys::memfd::{MemfdKind, memfd_create, set_len};
        use crate::sys::mman::{Protection, Reservation};
        use crate::sys::size::PageSize;

        let fd = memfd_create("uffd-test", MemfdKind::Shmem).unwrap();
        set_len(fd.as_fd(), 64 << 10).unwrap();
        let res = Reservation::new(128 << 10, PageSize::Base4K).unwrap();
        // SAFETY: the reservation is fresh; nothing references it.
        let (primary, alias) = unsafe {
            (
                res.place_shared(0, 64 << 10, fd.as_fd(), 0, Protection::ReadWrite, 0)
                    .unwrap(),
                res.place_shared(64 << 10, 64 << 10, fd.as_fd(), 0, Protection::ReadWrite, 0)
                    .unwrap(),
            )
        };
        let (uffd, _) = Userfaultfd::open(OpenFlags {
            nonblocking: true,
            ..OpenFlags::default()
        })
        .unwrap();
        uffd.api(Features::MINOR_SHMEM).unwrap();
        uffd.register(primary.as_ptr(), 64 << 10, RegisterMode::MINOR)
            .unwrap();
        // SAFETY: in bounds of the 64 KiB alias.
        unsafe { alias.as_ptr().add(4096).write_volatile(0x5A) };
        // SAFETY: the page is registered and its page-cache page holds 0x5A.
        let mapped = unsafe { uffd.continue_range(primary.as_ptr().add(4096), 4096, 0) }.unwrap();
        assert_eq!(mapped, 4096);
        // SAFETY: the page is now mapped; reading it does not fault.
        assert_eq!(unsafe { primary.as_ptr().add(4096).read_volatile() }, 0x5A);
        // SAFETY: as above.
        let again = unsafe { uffd.continue_range(primary.as_ptr().add(4096), 4096, 0) };
        assert_eq!(again.unwrap_err().errno(), Errno::EEXIST);
        let mut msgs = [UffdMsg::default(); 4];
        assert_eq!(uffd.read_events(&mut msgs).unwrap(), 0);
    }
}
