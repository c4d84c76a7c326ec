//! The command shim: `cronguard __shim -- PROGRAM ARGS...`.
//!
//! The parent-death signal reaches only the service's *direct* child and is
//! cleared in that child's own children, so `sh -c 'sleep 300'` would leave
//! `sleep` running after a `kill -9` of the service. Every command therefore
//! runs under this small shim, exec'd from the service's binary:
//!
//! - it leads the run's process group and carries the parent-death signal
//!   (SIGTERM), set by the service between fork and exec;
//! - it is a child subreaper, so descendants that leave the group (setsid,
//!   double fork) are reparented to it while it lives;
//! - it spawns the program in its group, reaps every child, and exits with
//!   the program's status (re-raising a fatal signal);
//! - on SIGTERM it checks whether its parent is gone: if so (the service
//!   died), it SIGKILLs its reparented descendants and its whole group,
//!   itself included; if not, the SIGTERM was the service's graceful
//!   group-wide signal, which the program received too, and it keeps waiting.
//!
//! No async runtime: blocked signals and `sigwait`, nothing else.

use std::ffi::OsString;
use std::process::Command;

use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, killpg, raise, sigprocmask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, getpgrp, getppid};

/// Exit code when the program cannot be started (as shells use).
pub const CANNOT_START: i32 = 127;

/// How the shim's report of a failed start begins (the executor turns the
/// line into the run's error).
pub const START_FAILED: &str = "cronguard: could not start ";

/// Runs the shim with `argv` = `[PROGRAM, ARGS...]`; never returns.
pub fn main(argv: Vec<OsString>) -> ! {
    let parent = getppid();
    let Some((program, args)) = argv.split_first() else {
        eprintln!("cronguard shim: no program given");
        std::process::exit(CANNOT_START);
    };
    // Signals are handled synchronously with sigwait; blocked from now on
    // (a SIGTERM that arrived earlier simply terminated the shim, before it
    // started anything). A mask survives exec, so the program's is cleared
    // between fork and exec ([`clean_signals`]).
    let mut watched = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        watched.add(s);
    }
    if sigprocmask(SigmaskHow::SIG_BLOCK, Some(&watched), None).is_err() {
        std::process::exit(CANNOT_START);
    }
    if getppid() != parent {
        parent_died();
    }
    let _ = crate::procfs::become_subreaper();
    let mut command = Command::new(program);
    command.args(args);
    clean_signals(&mut command);
    let main_child = match command.spawn() {
        Ok(child) => Pid::from_raw(child.id() as i32),
        Err(e) => {
            eprintln!("{START_FAILED}`{}`: {e}", program.to_string_lossy());
            std::process::exit(CANNOT_START);
        }
    };
    loop {
        match watched.wait() {
            Ok(Signal::SIGCHLD) => {
                if let Some(status) = reap(main_child) {
                    exit_like(status);
                }
            }
            Ok(_) if getppid() != parent => parent_died(),
            // The service's graceful signal to the whole group: the program
            // got it as well; its exit arrives as SIGCHLD.
            Ok(_) | Err(_) => {}
        }
    }
}

/// Gives `cmd`'s program the signal state of a fresh process: nothing
/// blocked and every disposition the default. Without it a job's program
/// would inherit the shim's blocked SIGTERM, never run its TERM handler,
/// and every graceful stop would end in SIGKILL after the kill grace.
#[expect(
    unsafe_code,
    reason = "pre_exec is the only way to set the program's signal state between fork and exec"
)]
fn clean_signals(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child between fork and exec.
    // sigprocmask and sigaction are async-signal-safe; it takes no locks
    // and allocates nothing.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
                .map_err(std::io::Error::from)?;
            for signal in Signal::iterator() {
                if !matches!(signal, Signal::SIGKILL | Signal::SIGSTOP) {
                    let _ = nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::SigDfl);
                }
            }
            Ok(())
        });
    }
}

/// Reaps every exited child; returns the main child's status once it ended.
fn reap(main_child: Pid) -> Option<WaitStatus> {
    let mut main_status = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return main_status,
            Ok(status) if status.pid() == Some(main_child) => {
                if matches!(status, WaitStatus::Exited(..) | WaitStatus::Signaled(..)) {
                    main_status = Some(status);
                }
            }
            Ok(_) => {}
        }
    }
}

/// Exits with the program's status, re-raising a fatal signal.
fn exit_like(status: WaitStatus) -> ! {
    match status {
        WaitStatus::Exited(_, code) => std::process::exit(code),
        WaitStatus::Signaled(_, signal, _) => {
            let mut set = SigSet::empty();
            set.add(signal);
            let _ = sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None);
            let _ = raise(signal);
            std::process::exit(128 + signal as i32)
        }
        _ => std::process::exit(CANNOT_START),
    }
}

/// The service is gone: nothing of this run may outlive it.
fn parent_died() -> ! {
    for p in crate::procfs::own_children() {
        crate::procfs::kill_process(&p);
    }
    let _ = killpg(getpgrp(), Signal::SIGKILL);
    let _ = kill(Pid::this(), Signal::SIGKILL);
    std::process::exit(137)
}
