//! The compiled-component cache: wasmtime's serialized artifacts on disk, so
//! a host with hundreds of handlers restarts without recompiling them.
//!
//! An entry is keyed by the component's sha256 and by the engine's
//! compatibility hash (wasmtime version and every setting that changes
//! code), so a new wasmtime or a new engine setting never loads an old
//! artifact. Each entry carries the sha256 of its own bytes: a truncated or
//! corrupted file is detected, ignored and rebuilt. Loading an artifact
//! runs its machine code, so the cache directory must be writable by the
//! host only (docs/SECURITY.md); wasmtime itself also refuses artifacts
//! built for another engine.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// A cache directory bound to one engine.
#[derive(Clone)]
pub struct CompileCache {
    dir: PathBuf,
    engine_key: String,
}

/// Length of the checksum that precedes each entry's artifact.
const CHECKSUM_BYTES: usize = 32;

impl CompileCache {
    pub fn new(dir: &Path, engine: &Engine) -> Self {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Self { dir: dir.to_owned(), engine_key: format!("{:016x}", hasher.finish()) }
    }

    fn entry(&self, version: &str) -> PathBuf {
        self.dir.join(format!("{version}-{}.cwasm", self.engine_key))
    }

    /// The cached compilation of `version`, if a sound one exists.
    pub fn load(&self, engine: &Engine, version: &str) -> Option<Component> {
        let path = self.entry(version);
        let bytes = std::fs::read(&path).ok()?;
        let (checksum, artifact) = bytes.split_at_checked(CHECKSUM_BYTES)?;
        if Sha256::digest(artifact).as_slice() != checksum {
            tracing::warn!(path = %path.display(), "compiled-component cache entry is corrupt; recompiling");
            return None;
        }
        // SAFETY: the artifact was written by this host (the cache directory
        // is the host's alone), its checksum matches, and wasmtime checks
        // that it was compiled for this engine's version and settings.
        match unsafe { Component::deserialize(engine, artifact) } {
            Ok(component) => Some(component),
            Err(error) => {
                tracing::warn!(path = %path.display(), error = %format!("{error:#}"), "compiled-component cache entry refused; recompiling");
                None
            }
        }
    }

    /// Removes every entry but those of the versions in `keep` built by this
    /// engine (entries of other engines are of no use to it: a wasmtime
    /// upgrade leaves them behind). Best effort; returns how many went.
    pub fn prune(&self, keep: &std::collections::HashSet<String>) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return 0 };
        let suffix = format!("-{}.cwasm", self.engine_key);
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".cwasm") {
                continue;
            }
            let kept = name.strip_suffix(&suffix).is_some_and(|version| keep.contains(version));
            if !kept && std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    /// Stores a compilation (best effort: a cache that cannot be written
    /// only costs a recompile at the next start).
    pub fn store(&self, version: &str, component: &Component) {
        let result = (|| -> anyhow::Result<()> {
            let artifact = component.serialize().map_err(anyhow::Error::from)?;
            std::fs::create_dir_all(&self.dir)?;
            let mut bytes = Sha256::digest(&artifact).to_vec();
            bytes.extend_from_slice(&artifact);
            // Write then rename: a crash never leaves a half-written entry
            // under the real name.
            let path = self.entry(version);
            let temporary = path.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&temporary, bytes)?;
            std::fs::rename(&temporary, &path)?;
            Ok(())
        })();
        if let Err(error) = result {
            tracing::warn!(dir = %self.dir.display(), error = %format!("{error:#}"), "could not write the compiled-component cache");
        }
    }
}
