//! The database behind the embedded store, and getting it back after an I/O
//! error without a restart.
//!
//! redb refuses every transaction after a failed write ("Previous I/O error
//! occurred. Please close and re-open the database"): a full disk would
//! otherwise need a restart once space returns. The handle closes the
//! database when that happens and reopens it (redb repairs the file from
//! its last durable commit) with backoff, while callers are answered
//! "unavailable" at once.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase};

use super::codec::{CLAIMS, DEAD_LETTERS, QUEUE, STATE};
use crate::pipeline::Backoff;
use crate::store::StoreError;

/// First and longest wait between attempts to reopen the file.
const FIRST_REOPEN_WAIT: Duration = Duration::from_millis(200);
const MAX_REOPEN_WAIT: Duration = Duration::from_secs(5);
/// How long a reopen waits for readers to let go of the old database.
const READERS_GRACE: Duration = Duration::from_secs(5);

/// Whether the database can be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// Open, as it was.
    Open,
    /// Open again after a failure: what was not durable is gone.
    Reopened,
    /// Closed; not reopened yet.
    Closed,
}

/// The open database, or why there is none right now.
pub struct DbHandle {
    path: PathBuf,
    cache_bytes: usize,
    db: RwLock<Result<Arc<Database>, String>>,
    reopen: Mutex<ReopenState>,
}

struct ReopenState {
    backoff: Backoff,
    next_try: Instant,
    /// When the current outage began (the first failed write), if in one.
    outage_since: Option<Instant>,
}

impl DbHandle {
    /// Opens (or creates) the file; its directory is created if missing.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Self, String> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("creating store directory {}: {e}", dir.display()))?;
        }
        let db = open_file(path, cache_bytes)?;
        let reopen = ReopenState { backoff: Backoff::new(FIRST_REOPEN_WAIT, MAX_REOPEN_WAIT), next_try: Instant::now(), outage_since: None };
        Ok(Self { path: path.to_owned(), cache_bytes, db: RwLock::new(Ok(Arc::new(db))), reopen: Mutex::new(reopen) })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The database, or "unavailable" while it is being reopened.
    pub fn get(&self) -> Result<Arc<Database>, StoreError> {
        match &*self.db.read().unwrap_or_else(|p| p.into_inner()) {
            Ok(db) => Ok(db.clone()),
            Err(why) => Err(StoreError::Unavailable(anyhow::anyhow!("embedded store {} is unavailable: {why}", self.path.display()))),
        }
    }

    /// Why the store cannot be used now, if it cannot.
    pub fn trouble(&self) -> Option<String> {
        self.db.read().unwrap_or_else(|p| p.into_inner()).as_ref().err().cloned()
    }

    /// Closes the database after a failed write; a later
    /// [`DbHandle::recover`] reopens it, no sooner than the backoff allows
    /// (a disk that is still full fails the next write too).
    pub fn fail(&self, why: String) {
        {
            let mut reopen = self.reopen.lock().unwrap_or_else(|p| p.into_inner());
            if reopen.outage_since.is_none() {
                reopen.outage_since = Some(Instant::now());
                tracing::error!(path = %self.path.display(), error = %why,
                    "embedded store write failed; events are deferred and publishes refused until it can be written again");
            }
            reopen.next_try = Instant::now() + reopen.backoff.next_delay();
        }
        let old = std::mem::replace(&mut *self.db.write().unwrap_or_else(|p| p.into_inner()), Err(why));
        if let Ok(old) = old {
            wait_for_readers(old);
        }
    }

    /// A write was committed: an outage, if there was one, is over.
    pub fn succeeded(&self) {
        let mut reopen = self.reopen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(since) = reopen.outage_since.take() {
            reopen.backoff.reset();
            tracing::info!(path = %self.path.display(), outage = ?since.elapsed(), "embedded store written again; events flow");
        }
    }

    /// If the database is closed, tries to reopen it (not more often than
    /// the backoff allows).
    pub fn recover(&self) -> Availability {
        if self.trouble().is_none() {
            return Availability::Open;
        }
        let mut reopen = self.reopen.lock().unwrap_or_else(|p| p.into_inner());
        if Instant::now() < reopen.next_try {
            return Availability::Closed;
        }
        match open_file(&self.path, self.cache_bytes) {
            Ok(db) => {
                *self.db.write().unwrap_or_else(|p| p.into_inner()) = Ok(Arc::new(db));
                tracing::debug!(path = %self.path.display(), "embedded store reopened");
                Availability::Reopened
            }
            Err(why) => {
                let wait = reopen.backoff.next_delay();
                reopen.next_try = Instant::now() + wait;
                tracing::debug!(path = %self.path.display(), error = %why, retry_in = ?wait, "embedded store cannot be reopened yet");
                *self.db.write().unwrap_or_else(|p| p.into_inner()) = Err(why);
                Availability::Closed
            }
        }
    }
}

/// Lets readers that hold the old database finish, so its file lock is
/// released before the file is opened again.
fn wait_for_readers(mut db: Arc<Database>) {
    let deadline = Instant::now() + READERS_GRACE;
    loop {
        match Arc::try_unwrap(db) {
            Ok(db) => {
                drop(db);
                return;
            }
            Err(shared) if Instant::now() < deadline => {
                db = shared;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => {
                tracing::warn!("readers still hold the closed embedded store; reopening may have to wait");
                return;
            }
        }
    }
}

/// Opens the file with its tables, bounding redb's page cache.
fn open_file(path: &Path, cache_bytes: usize) -> Result<Database, String> {
    let db = Database::builder()
        .set_cache_size(cache_bytes)
        .create(path)
        .map_err(|e| format!("opening embedded store {}: {e}", path.display()))?;
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    txn.open_table(CLAIMS).map_err(|e| e.to_string())?;
    txn.open_table(STATE).map_err(|e| e.to_string())?;
    txn.open_table(QUEUE).map_err(|e| e.to_string())?;
    txn.open_table(DEAD_LETTERS).map_err(|e| e.to_string())?;
    txn.commit().map_err(|e| format!("initialising embedded store {}: {e}", path.display()))?;
    // Touch the read side too: a file that opens but cannot be read is not open.
    db.begin_read().map_err(|e| e.to_string())?;
    Ok(db)
}
