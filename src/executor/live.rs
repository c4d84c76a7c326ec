//! The output of running commands, for whoever follows it live
//! (`GET /v1/runs/{run}/output`).
//!
//! Each command run registers a [`Watch`] holding its two bounded tails
//! (stdout and stderr apart). Every chunk read from a pipe goes into its
//! tail and, under the same lock, to a broadcast channel; a follower takes
//! a snapshot of both tails and subscribes under that lock, so it misses
//! nothing and sees nothing twice. A follower that falls behind loses
//! chunks (and is told); the reader of the pipes never waits for one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::broadcast;

use super::Tail;
use crate::run::RunId;

/// Chunks a follower may have waiting before it loses some.
const CHUNKS: usize = 256;

/// Which pipe a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pipe {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Pipe {
    /// `stdout` or `stderr` (the SSE event name).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

/// A piece of output as it was read.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// Its pipe.
    pub pipe: Pipe,
    /// Its text (invalid UTF-8 replaced).
    pub text: Arc<str>,
}

/// What a new follower gets: both tails so far, then every chunk.
pub struct Following {
    /// Standard output so far (the kept tail).
    pub stdout: String,
    /// Standard error so far.
    pub stderr: String,
    /// Chunks from now on; closed when the run's pipes are done.
    pub chunks: broadcast::Receiver<Chunk>,
}

/// One running command's output.
pub struct Watch {
    state: Mutex<Tails>,
    chunks: broadcast::Sender<Chunk>,
}

struct Tails {
    stdout: Tail,
    stderr: Tail,
}

impl Watch {
    /// Appends `bytes` read from `pipe`.
    pub fn push(&self, pipe: Pipe, bytes: &[u8]) {
        let mut tails = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match pipe {
            Pipe::Stdout => tails.stdout.push(bytes),
            Pipe::Stderr => tails.stderr.push(bytes),
        }
        let _ = self.chunks.send(Chunk {
            pipe,
            text: String::from_utf8_lossy(bytes).into(),
        });
    }

    /// Takes both tails' text (stdout, stderr).
    pub fn take(&self) -> (Option<String>, Option<String>) {
        let mut tails = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        (tails.stdout.take_text(), tails.stderr.take_text())
    }
}

/// Every running command's output, by run.
#[derive(Default)]
pub struct LiveOutput {
    runs: Mutex<HashMap<RunId, Arc<Watch>>>,
}

impl std::fmt::Debug for LiveOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveOutput").finish_non_exhaustive()
    }
}

/// Unregisters a run's watch when its capture ends (or is dropped).
pub struct Registered<'a> {
    live: &'a LiveOutput,
    run: RunId,
    /// The run's output.
    pub watch: Arc<Watch>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.live
            .runs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.run);
    }
}

impl LiveOutput {
    /// Registers `run`'s output, each tail bounded by `cap` bytes.
    pub fn open(&self, run: RunId, cap: usize) -> Registered<'_> {
        let (chunks, _) = broadcast::channel(CHUNKS);
        let watch = Arc::new(Watch {
            state: Mutex::new(Tails {
                stdout: Tail::new(cap),
                stderr: Tail::new(cap),
            }),
            chunks,
        });
        self.runs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(run, watch.clone());
        Registered {
            live: self,
            run,
            watch,
        }
    }

    /// Follows `run`'s output, if it is a command running here.
    pub fn follow(&self, run: RunId) -> Option<Following> {
        let watch = self
            .runs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&run)
            .cloned()?;
        let tails = watch.state.lock().unwrap_or_else(PoisonError::into_inner);
        Some(Following {
            stdout: tails.stdout.text(),
            stderr: tails.stderr.text(),
            chunks: watch.chunks.subscribe(),
        })
    }
}
