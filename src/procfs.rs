//! The process table as Linux shows it in `/proc`.
//!
//! Identity across pid reuse is (pid, start time in clock ticks since boot);
//! ownership of a descendant is the `CRONGUARD_RUN` variable every command
//! run's process tree inherits.

use std::collections::HashMap;

use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

use crate::run::RunId;

/// One process, from `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proc {
    /// Process id.
    pub pid: i32,
    /// Parent process id.
    pub ppid: i32,
    /// Process group.
    pub pgid: i32,
    /// State letter (`R`, `S`, `Z` for zombie, ...).
    pub state: char,
    /// Start time, clock ticks since boot.
    pub start_ticks: u64,
}

impl Proc {
    /// Whether it has exited and waits to be reaped.
    pub fn is_zombie(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

/// Reads one process; `None` if it does not exist (any more).
pub fn read(pid: i32) -> Option<Proc> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(Proc {
        pid,
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        pgid: fields.get(2)?.parse().ok()?,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

/// Every process visible in `/proc`.
pub fn all() -> Vec<Proc> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(read)
        .collect()
}

/// This process's direct children (including descendants reparented to
/// it as child subreaper). Reads each thread's `children` list, which is
/// cheap; falls back to scanning all of `/proc` where the kernel lacks it.
pub fn own_children() -> Vec<Proc> {
    let me = std::process::id() as i32;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return all().into_iter().filter(|p| p.ppid == me).collect();
    };
    let mut pids = Vec::new();
    for task in tasks.flatten() {
        match std::fs::read_to_string(task.path().join("children")) {
            Ok(text) => pids.extend(text.split_whitespace().filter_map(|p| p.parse::<i32>().ok())),
            Err(_) => return all().into_iter().filter(|p| p.ppid == me).collect(),
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids.into_iter()
        .filter_map(read)
        .filter(|p| p.ppid == me)
        .collect()
}

/// Whether `pid` is alive and is the process that started at `start_ticks`.
pub fn is_same_live_process(pid: i32, start_ticks: u64) -> bool {
    read(pid).is_some_and(|p| p.start_ticks == start_ticks && !p.is_zombie())
}

/// The run a process belongs to, from its inherited `CRONGUARD_RUN`.
pub fn run_of(pid: i32) -> Option<RunId> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    environ
        .split(|b| *b == 0)
        .find_map(|var| var.strip_prefix(b"CRONGUARD_RUN="))
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse().ok())
}

/// Live (non-zombie) processes by the run they belong to.
pub fn by_run() -> HashMap<RunId, Vec<Proc>> {
    let mut map: HashMap<RunId, Vec<Proc>> = HashMap::new();
    for p in all().into_iter().filter(|p| !p.is_zombie()) {
        if let Some(run) = run_of(p.pid) {
            map.entry(run).or_default().push(p);
        }
    }
    map
}

/// SIGKILL to `p`, and to its group when it leads one.
pub fn kill_process(p: &Proc) {
    let pid = Pid::from_raw(p.pid);
    if p.pgid == p.pid {
        let _ = killpg(pid, Signal::SIGKILL);
    }
    let _ = kill(pid, Signal::SIGKILL);
}

/// Reaps `pid` if it is our exited child; never blocks, never touches
/// other children (tokio reaps the ones it spawned).
pub fn reap(pid: i32) -> bool {
    matches!(
        waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)),
        Ok(status) if status.pid().is_some()
    )
}

/// Makes this process the child subreaper: orphaned descendants are
/// reparented to it instead of to init, so it can find and reap them.
pub fn become_subreaper() -> nix::Result<()> {
    nix::sys::prctl::set_child_subreaper(true)
}
