//! Loading a handler component: read, hash, compile, and check it against the
//! handler world before it may serve. One `HandlerPre` per version: imports
//! are resolved once here, so per-event instantiation does no linking.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::{Component, Linker};

use super::bindings::{HANDLER_WORLD, HandlerPre};
use crate::text::one_line;
use super::cache::CompileCache;
use super::host_state::AttemptState;

/// A loaded, checked handler version.
pub struct HandlerComponent {
    /// sha256 of the component bytes, in hex: the version's identity.
    pub version: String,
    /// Where it came from (a file, or an upload's description).
    pub path: PathBuf,
    /// Bytes of compiled code this version keeps in memory.
    pub code_bytes: usize,
    /// The short version, shared (a metrics label, cloned per event).
    pub label: std::sync::Arc<str>,
    pub(super) pre: HandlerPre<AttemptState>,
}

impl HandlerComponent {
    /// The first 12 hex digits of the version, for logs.
    pub fn short_version(&self) -> &str {
        &self.label
    }
}

/// Why a component cannot serve; the old version (if any) keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read component {path}")]
    /// The file could not be read.
    Read {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    #[error("component {path} is not a valid WebAssembly component: {reason}")]
    /// The bytes are not a component wasmtime accepts.
    Invalid {
        /// Where the bytes came from.
        path: PathBuf,
        /// What wasmtime said.
        reason: String,
    },
    #[error("component {path} does not target the world {HANDLER_WORLD}: {reason}")]
    /// A component, but not of the handler world.
    WrongWorld {
        /// Where the bytes came from.
        path: PathBuf,
        /// The import or export that does not fit.
        reason: String,
    },
}

pub fn load(engine: &Engine, linker: &Linker<AttemptState>, cache: Option<&CompileCache>, path: &Path) -> Result<HandlerComponent, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Read { path: path.to_owned(), source })?;
    from_bytes(engine, linker, cache, path, &bytes)
}

/// Checks and prepares component bytes; `path` names them in errors. A
/// cached compilation is used when there is a sound one.
pub fn from_bytes(
    engine: &Engine,
    linker: &Linker<AttemptState>,
    cache: Option<&CompileCache>,
    path: &Path,
    bytes: &[u8],
) -> Result<HandlerComponent, LoadError> {
    let version = hex::encode(Sha256::digest(bytes));
    let component = match cache.and_then(|cache| cache.load(engine, &version)) {
        Some(component) => component,
        None => {
            // Large components (Python, JavaScript) take seconds: say why
            // start-up or a deploy is waiting.
            tracing::info!(path = %path.display(), bytes = bytes.len(), "compiling component (not in the compile cache)");
            let component = Component::from_binary(engine, bytes)
                .map_err(|e| LoadError::Invalid { path: path.to_owned(), reason: one_line(&format!("{e:#}")) })?;
            if let Some(cache) = cache {
                cache.store(&version, &component);
            }
            component
        }
    };
    // Unsatisfied imports fail here, missing or mistyped exports in
    // `HandlerPre::new`: both mean "not a handler".
    let wrong_world = |e: wasmtime::Error| LoadError::WrongWorld { path: path.to_owned(), reason: one_line(&format!("{e:#}")) };
    let image = component.image_range();
    let code_bytes = (image.end as usize).saturating_sub(image.start as usize);
    let instance_pre = linker.instantiate_pre(&component).map_err(wrong_world)?;
    let pre = HandlerPre::new(instance_pre).map_err(wrong_world)?;
    let label = std::sync::Arc::from(&version[..12]);
    Ok(HandlerComponent { version, path: path.to_owned(), code_bytes, label, pre })
}
