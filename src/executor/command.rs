//! The command action: a child process in its own process group.
//!
//! Ownership rules (`docs/supervision.md`):
//! - the child leads a new process group, so the whole tree it forks can be
//!   signalled at once with `killpg`;
//! - it gets `PR_SET_PDEATHSIG = SIGKILL`, so it dies if the service dies.
//!   The signal follows the *thread* that forked, so children are spawned
//!   from the run's task on a runtime worker thread, which lives as long as
//!   the runtime (never from the blocking pool, whose threads retire);
//! - on timeout or cancellation the group gets SIGTERM, then SIGKILL after
//!   the kill grace; when the leader exits on its own, whatever is left in
//!   its group is killed too — the run is over;
//! - a guard kills the group if the run's task is dropped mid-flight.
//!
//! Output: stdout and stderr are read concurrently into one bounded tail and
//! drained until EOF, so a chatty child never blocks on a full pipe. Once the
//! leader has exited, draining stops after [`DRAIN_AFTER_EXIT`], because a
//! daemonized grandchild may hold the pipe open indefinitely.

use std::collections::HashMap;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::pin::{Pin, pin};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStderr, ChildStdout, Command};
use tokio_util::sync::CancellationToken;

use super::live::{Pipe, Watch};
use super::{Limits, Occurrence};
use crate::action::CommandAction;
use crate::run::{Outcome, RunId, RunStatus};

/// Variables a command inherits from the service; everything else it gets
/// is set explicitly.
pub const INHERITED_ENV: &[&str] = &[
    "PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER", "LOGNAME", "SHELL",
];

/// How long output is still read after the leader exited.
pub const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);

/// The process a command run started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Its pid.
    pub pid: i32,
    /// Its process group (equal to the pid: it leads the group).
    pub pgid: i32,
    /// Its start time in clock ticks since boot (`/proc/<pid>/stat`).
    pub start_ticks: Option<u64>,
}

/// Leaders of command runs this process spawned and tokio has not reaped
/// yet. The stray reaper leaves these alone; spawning happens under the
/// table's lock so the reaper can never see a new child before it is listed.
#[derive(Debug, Clone, Default)]
pub struct ProcessTable(Arc<std::sync::Mutex<HashMap<i32, RunId>>>);

impl ProcessTable {
    /// The table, locked.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, RunId>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Kills the group when dropped, unless disarmed.
struct GroupGuard(Option<Pid>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

struct Unlist<'a>(&'a ProcessTable, i32);

impl Drop for Unlist<'_> {
    fn drop(&mut self) {
        self.0.lock().remove(&self.1);
    }
}

/// Why the wait for the leader ended.
#[derive(Clone, Copy)]
enum End {
    Exited,
    TimedOut,
    Cancelled,
}

/// How to start a command: directly, or under the shim (see `shim.rs`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Launch<'a> {
    /// The cronguard binary to run as `__shim`, if any.
    pub shim: Option<&'a std::path::Path>,
    /// Leaders of live command runs.
    pub table: &'a ProcessTable,
    /// Where followers read the output live.
    pub live: &'a super::live::LiveOutput,
}

pub(super) async fn execute<F, Fut>(
    action: &CommandAction,
    occurrence: &Occurrence,
    limits: Limits,
    tail_bytes: usize,
    cancel: &CancellationToken,
    launch: Launch<'_>,
    on_spawn: F,
) -> Outcome
where
    F: FnOnce(ProcessInfo) -> Fut,
    Fut: Future<Output = ()>,
{
    let failed = |error: String| Outcome {
        attempts: occurrence.attempt,
        ..Outcome::failed(error)
    };
    let mut cmd = match command(action, occurrence, launch) {
        Ok(cmd) => cmd,
        Err(error) => return failed(error),
    };
    let (mut child, pid) = match spawn(&mut cmd, launch.table, occurrence.run_id) {
        Ok(Some(spawned)) => spawned,
        Ok(None) => return Outcome::failed("the child exited before its pid could be read"),
        Err(e) => return failed(format!("could not start `{}`: {e}", action.program)),
    };
    // Unlisted once tokio has reaped it (or the run's task is dropped).
    let _listed = Unlist(launch.table, pid);
    let group = Pid::from_raw(pid);
    let mut guard = GroupGuard(Some(group));
    on_spawn(ProcessInfo {
        pid,
        pgid: pid,
        start_ticks: crate::procfs::read(pid).map(|p| p.start_ticks),
    })
    .await;

    // Followers see the pipes close when this function returns (the last
    // holder of the watch is gone, and it is unregistered).
    let registered = launch.live.open(occurrence.run_id, tail_bytes);
    let watch = registered.watch.clone();
    let mut capture = Capture {
        reading: pin!(capture(child.stdout.take(), child.stderr.take(), &watch)),
        drained: false,
    };
    let (end, status) = wait(&mut child, group, limits, cancel, &mut capture).await;
    // The leader is gone; anything left in its group is a leftover of this
    // run and goes with it.
    let _ = killpg(group, Signal::SIGKILL);
    guard.0 = None;
    if !capture.drained {
        let _ = tokio::time::timeout(DRAIN_AFTER_EXIT, &mut capture.reading).await;
    }
    let (output, stderr) = watch.take();
    let (run_status, error) = judge(end, &status, stderr.as_deref(), limits, launch.shim.is_some());
    Outcome {
        status: run_status,
        reason: None,
        attempts: occurrence.attempt,
        exit_code: status.as_ref().ok().and_then(ExitStatus::code),
        http_status: None,
        error,
        output,
        stderr,
        attempt_log: Vec::new(),
    }
}

/// The command as it will be spawned: under the shim or direct, with a
/// clean environment, in its own process group, dying with the service.
/// An environment variable whose secret cannot be resolved is the error.
fn command(action: &CommandAction, occurrence: &Occurrence, launch: Launch<'_>) -> Result<Command, String> {
    let mut cmd = match launch.shim {
        Some(shim) => {
            let mut cmd = Command::new(shim);
            cmd.arg(super::SHIM_ARG).arg(&action.program);
            cmd
        }
        None => Command::new(&action.program),
    };
    // A clean environment: the service's own variables (its tokens and
    // secrets) are not the job's. Only the basics, the job's variables
    // (with `${CRONGUARD_SECRET_*}` references resolved) and the
    // occurrence identity.
    let mut env = Vec::with_capacity(action.env.len());
    for (name, value) in &action.env {
        let value = crate::secrets::expand(value).map_err(|e| format!("environment variable {name}: {e}"))?;
        env.push((name, value));
    }
    cmd.env_clear();
    for name in INHERITED_ENV {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    cmd.args(&action.args)
        .envs(env)
        .env("CRONGUARD_JOB", occurrence.job_id.to_string())
        .env("CRONGUARD_JOB_NAME", &occurrence.job_name)
        .env("CRONGUARD_RUN", occurrence.run_id.to_string())
        .env("CRONGUARD_SCHEDULED_AT", occurrence.scheduled_at_text())
        .env("CRONGUARD_ATTEMPT", occurrence.attempt.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = &action.working_dir {
        cmd.current_dir(dir);
    }
    // The shim turns SIGTERM from a dead parent into SIGKILL for the whole
    // run; a direct child simply dies.
    let death_signal = if launch.shim.is_some() {
        Signal::SIGTERM
    } else {
        Signal::SIGKILL
    };
    set_parent_death_signal(&mut cmd, death_signal);
    Ok(cmd)
}

/// Spawns under the table's lock, so the stray reaper never sees the new
/// leader before it is listed. `None`: it exited before its pid was read.
fn spawn(cmd: &mut Command, table: &ProcessTable, run: RunId) -> io::Result<Option<(Child, i32)>> {
    let mut table = table.lock();
    let child = cmd.spawn()?;
    let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
        return Ok(None);
    };
    table.insert(pid, run);
    Ok(Some((child, pid)))
}

/// The pipes being read while the leader runs.
struct Capture<'a> {
    reading: Pin<&'a mut (dyn Future<Output = ()> + Send + 'a)>,
    drained: bool,
}

/// Waits for the leader to exit, for the timeout or for cancellation; on
/// the latter two the group gets SIGTERM, then SIGKILL after the grace.
/// Output is read all along, so a chatty child never blocks on a full pipe.
async fn wait(
    child: &mut Child,
    group: Pid,
    limits: Limits,
    cancel: &CancellationToken,
    capture: &mut Capture<'_>,
) -> (End, io::Result<ExitStatus>) {
    let deadline = tokio::time::Instant::now() + limits.timeout;
    let end = loop {
        tokio::select! {
            () = &mut capture.reading, if !capture.drained => capture.drained = true,
            status = child.wait() => return (End::Exited, status),
            () = tokio::time::sleep_until(deadline) => break End::TimedOut,
            () = cancel.cancelled() => break End::Cancelled,
        }
    };
    let _ = killpg(group, Signal::SIGTERM);
    let mut grace = pin!(tokio::time::sleep(limits.kill_grace));
    loop {
        tokio::select! {
            () = &mut capture.reading, if !capture.drained => capture.drained = true,
            status = child.wait() => return (end, status),
            () = &mut grace => break,
        }
    }
    let _ = killpg(group, Signal::SIGKILL);
    (end, child.wait().await)
}

/// The run's status and error from how the wait ended and how the leader
/// exited. Under the shim, exit code 127 with the shim's report on
/// standard error means the program could not be started.
fn judge(
    end: End,
    status: &io::Result<ExitStatus>,
    stderr: Option<&str>,
    limits: Limits,
    shim: bool,
) -> (RunStatus, Option<String>) {
    match (end, status) {
        (End::TimedOut, _) => (
            RunStatus::TimedOut,
            Some(format!(
                "timed out after {}",
                humantime::format_duration(limits.timeout)
            )),
        ),
        (End::Cancelled, _) => (RunStatus::Cancelled, Some("cancelled".to_owned())),
        (End::Exited, Ok(s)) if s.success() => (RunStatus::Succeeded, None),
        (End::Exited, Ok(s)) if s.code() == Some(super::shim::CANNOT_START) && shim => {
            let reported =
                stderr.and_then(|o| o.lines().find_map(|l| l.strip_prefix(super::shim::START_FAILED)));
            (
                RunStatus::Failed,
                Some(match reported {
                    Some(why) => format!("could not start {why}"),
                    None => "exited with code 127".to_owned(),
                }),
            )
        }
        (End::Exited, Ok(s)) => (
            RunStatus::Failed,
            Some(match (s.code(), s.signal()) {
                (Some(code), _) => format!("exited with code {code}"),
                (None, Some(sig)) => format!("killed by signal {sig}"),
                (None, None) => "exited abnormally".to_owned(),
            }),
        ),
        (End::Exited, Err(e)) => (
            RunStatus::Failed,
            Some(format!("waiting for the process failed: {e}")),
        ),
    }
}

/// Reads both pipes into their tails (and to live followers) until both
/// reach EOF.
async fn capture(stdout: Option<ChildStdout>, stderr: Option<ChildStderr>, watch: &Watch) {
    let mut out = stdout;
    let mut err = stderr;
    let mut buf_out = vec![0u8; 8192];
    let mut buf_err = vec![0u8; 8192];
    loop {
        tokio::select! {
            r = async { out.as_mut()?.read(&mut buf_out).await.ok() }, if out.is_some() => match r {
                Some(n) if n > 0 => watch.push(Pipe::Stdout, &buf_out[..n]),
                _ => out = None,
            },
            r = async { err.as_mut()?.read(&mut buf_err).await.ok() }, if err.is_some() => match r {
                Some(n) if n > 0 => watch.push(Pipe::Stderr, &buf_err[..n]),
                _ => err = None,
            },
            else => return,
        }
    }
}

/// Makes the child receive `signal` when the thread that forked it exits.
#[expect(
    unsafe_code,
    reason = "pre_exec is the only way to run prctl in the child before exec"
)]
fn set_parent_death_signal(cmd: &mut Command, signal: Signal) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child between fork and exec.
    // It makes only async-signal-safe system calls (prctl, getppid), takes
    // no locks and allocates nothing (the error is built from a raw errno).
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(signal).map_err(io::Error::from)?;
            // The parent may have died between fork and prctl, in which
            // case the signal was never delivered: refuse to run orphaned.
            if nix::unistd::getppid() != parent {
                return Err(io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        });
    }
}
