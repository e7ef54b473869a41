//! The process-wide SIGBUS disposition: install one handler, remember the
//! one it replaced, and chain to it for faults that are not ours.
#![allow(unsafe_code)] // `sigaction` and calling the previous handler

use std::sync::OnceLock;

use super::error::{SysError, SysResult};

/// A `SA_SIGINFO` signal handler.
pub(crate) type SigInfoHandler =
    extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// The SIGBUS action in place before ours; read by the handler.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
/// The outcome of the one installation attempt.
static INSTALLED: OnceLock<SysResult<()>> = OnceLock::new();

fn sigaction(new: Option<&libc::sigaction>, old: Option<&mut libc::sigaction>) -> SysResult<()> {
    let new = new.map_or(std::ptr::null(), |n| n as *const _);
    let old = old.map_or(std::ptr::null_mut(), |o| o as *mut _);
    // SAFETY: both pointers are null or point to valid `sigaction` structs;
    // a handler installed through `new` is an `extern "C"` function of the
    // signature SA_SIGINFO requires (checked by the caller's type).
    let ret = unsafe { libc::sigaction(libc::SIGBUS, new, old) };
    if ret == -1 {
        return Err(SysError::last("sigaction(SIGBUS)"));
    }
    Ok(())
}

/// Installs `handler` as the process's SIGBUS handler (`SA_SIGINFO |
/// SA_NODEFER`, on the faulting thread's own stack), once: later calls
/// return the first call's outcome. The previous action is kept for
/// [`chain_sigbus`].
pub(crate) fn install_sigbus(handler: SigInfoHandler) -> SysResult<()> {
    *INSTALLED.get_or_init(|| {
        // Read the old action before installing, so that the handler never
        // runs without a previous action to chain to.
        // SAFETY: an all-zero `sigaction` is a valid value to be overwritten.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        sigaction(None, Some(&mut old))?;
        let _ = PREVIOUS.set(old);
        // SAFETY: as above; every field is set below.
        let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
        new.sa_sigaction = handler as usize;
        // SA_NODEFER: a source that faults on another arena page while
        // filling gets that fault resolved too, instead of a blocked SIGBUS
        // killing the process.
        new.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER | libc::SA_RESTART;
        // SAFETY: `sa_mask` is a valid sigset to clear.
        unsafe { libc::sigemptyset(&mut new.sa_mask) };
        sigaction(Some(&new), None)
    })
}

/// Hands a SIGBUS that is not ours to the action that was in place before
/// [`install_sigbus`]. If that was the default (or ignore, which cannot
/// work for a fault), restores the default so that returning re-runs the
/// faulting instruction and the kernel kills the process as usual.
///
/// # Safety
///
/// Call only from the SIGBUS handler, with the arguments it received.
pub(crate) unsafe fn chain_sigbus(
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
) {
    let Some(prev) = PREVIOUS.get() else {
        return restore_default();
    };
    let action = prev.sa_sigaction;
    if action == libc::SIG_DFL || action == libc::SIG_IGN {
        return restore_default();
    }
    if prev.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: with SA_SIGINFO the stored action is a three-argument
        // handler; the caller passes the arguments the kernel gave us.
        let f: SigInfoHandler = unsafe { std::mem::transmute::<usize, SigInfoHandler>(action) };
        f(sig, info, ctx);
    } else {
        // SAFETY: without SA_SIGINFO the stored action is a one-argument
        // handler.
        let f = unsafe { std::mem::transmute::<usize, extern "C" fn(libc::c_int)>(action) };
        f(sig);
    }
}

fn restore_default() {
    // SAFETY: an all-zero `sigaction` with SIG_DFL (0) is the default action.
    let dfl: libc::sigaction = unsafe { std::mem::zeroed() };
    // Nothing to do if this fails: the process is about to die of the
    // re-raised fault either way.
    let _ = sigaction(Some(&dfl), None);
}

/// The faulting address of a SIGBUS.
///
/// # Safety
///
/// `info` must be the `siginfo_t` the kernel passed to a SIGBUS handler.
pub(crate) unsafe fn fault_address(info: *const libc::siginfo_t) -> usize {
    // SAFETY: for SIGBUS the kernel fills the `si_addr` member.
    unsafe { (*info).si_addr() as usize }
}
