//! The control plane: which handlers exist and which version serves each.
//!
//! - [`registry`]: tenants and handlers from the manifest (and added at
//!   runtime), indexed the ways deliveries arrive;
//! - [`deploy`]: hot swap and rollback, every new version checked by one
//!   `compile_checked` before it serves;
//! - [`journal`]: deploys recorded in the store and restored at start;
//! - [`watch`]: deploy on file change (`wasmsub run --watch`).

mod deploy;
pub(crate) mod journal;
pub(crate) mod registry;
pub(crate) mod watch;

pub use deploy::{DeployError, DeployEvent, Deployer, NewHandler, TopicHook, VersionChange};
