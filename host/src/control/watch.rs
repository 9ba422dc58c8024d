//! Deploy by file: with `wasmsub run --watch`, a handler's component file
//! changing on disk deploys it as the handler's new version.
//!
//! Events are debounced (a burst of writes is one change), and a file is
//! deployed only if its content hash differs from the serving version. A
//! half-written file is safe: it fails the component check and is refused
//! (the serving version stays), and the completed write triggers another
//! look. Writing to a temporary name and renaming over the file (what
//! `cp --remove-destination`, `install` or a build tool's atomic write do)
//! avoids even the refused attempt.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use notify_debouncer_mini::notify::RecursiveMode;
use notify_debouncer_mini::{DebounceEventResult, new_debouncer};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::deploy::Deployer;
use super::registry::Registry;

/// Quiet time after the last write before a file is looked at.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// Starts watching every handler's component file; the returned future
/// deploys changes until `shutdown`. The watches are in place when this
/// returns, so a change made after it is seen.
pub fn start(registry: Arc<Registry>, deployer: Deployer, shutdown: CancellationToken) -> anyhow::Result<impl std::future::Future<Output = ()> + Send> {
    let (changes, mut changed) = tokio::sync::mpsc::unbounded_channel::<Vec<PathBuf>>();
    let mut debouncer = new_debouncer(DEBOUNCE, move |result: DebounceEventResult| match result {
        Ok(events) => {
            let _ = changes.send(events.into_iter().map(|e| e.path).collect());
        }
        Err(error) => tracing::warn!(%error, "watching component files failed"),
    })
    .context("starting the component file watcher")?;
    // Watch directories, not files: an atomic rename replaces the file's
    // inode, and a watch on the old inode would go quiet.
    // A component named without a directory lives in the current one.
    let dirs: HashSet<PathBuf> = registry
        .handlers()
        .iter()
        .filter_map(|h| h.config.component.parent().map(|dir| if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir.to_path_buf() }))
        .collect();
    for dir in &dirs {
        debouncer.watcher().watch(dir, RecursiveMode::NonRecursive).with_context(|| format!("watching {}", dir.display()))?;
        tracing::info!(dir = %dir.display(), "watching for new handler versions");
    }
    Ok(async move {
        // Owned by the loop: dropping it would stop the watches.
        let _debouncer = debouncer;
        deploy_changes(&registry, &deployer, &mut changed, &shutdown).await;
    })
}

async fn deploy_changes(registry: &Registry, deployer: &Deployer, changed: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<PathBuf>>, shutdown: &CancellationToken) {
    // Content refused once is not retried until it changes again.
    let mut refused: HashMap<PathBuf, String> = HashMap::new();
    loop {
        let paths = tokio::select! {
            _ = shutdown.cancelled() => return,
            paths = changed.recv() => match paths { Some(p) => p, None => return },
        };
        for handler in registry.handlers().iter().filter(|h| paths.iter().any(|p| same_file(p, &h.config.component))) {
            let path = &handler.config.component;
            let Ok(bytes) = std::fs::read(path) else { continue }; // removed or mid-rename
            let version = hex::encode(Sha256::digest(&bytes));
            if version == handler.current().version || refused.get(path) == Some(&version) {
                continue;
            }
            match deployer.deploy(&handler.tenant.name, &handler.name, path, bytes).await {
                Ok(_) => {
                    refused.remove(path);
                }
                Err(_) => {
                    refused.insert(path.clone(), version);
                }
            }
        }
    }
}

fn same_file(event_path: &std::path::Path, component: &std::path::Path) -> bool {
    event_path == component || event_path.canonicalize().ok() == component.canonicalize().ok()
}
