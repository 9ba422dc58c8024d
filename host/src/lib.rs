//! wasmsub: sandboxed, hot-swappable WebAssembly event handlers next to Dapr.
//!
//! An event's path through the host, one module per stage:
//!
//! - [`receive`]: bytes → [`cloudevent::CloudEvent`] (size limit, parsing);
//! - [`dedupe`]: which id makes two deliveries the same event;
//! - [`store`]: claims with leases, tenant state and the outbox, committed
//!   together ([`store::EmbeddedStore`] on disk);
//! - [`runtime`]: dispatch, one attempt on a fresh sandboxed instance;
//! - [`effects`]: an attempt's state writes and publishes, held back until it
//!   succeeds;
//! - [`retry`]: the backoff policy (a pure `next_delay`);
//! - [`outcome`]: how a delivery ended and what Dapr is answered;
//! - [`dead_letter`]: the message for the dead-letter topic;
//! - [`relay`]: publishes committed outbox entries;
//! - [`pipeline`]: the stages above, in order, for one delivery.
//!
//! Around it: [`manifest`] (the `wasmsub.toml` file), [`registry`] (tenants,
//! handlers and their current versions), [`broker`] (the embedded pub/sub),
//! [`dapr`] (the sidecar client, the Dapr state store and the app routes),
//! [`deploy`] (hot swap and rollback), [`watch`] (deploy on file change),
//! [`server`] (HTTP routes), [`host`] (assembly), [`client`] (the CLI's HTTP
//! calls), [`demo`] and [`bench`].

pub mod bench;
pub mod broker;
pub mod client;
pub mod cloudevent;
pub mod dapr;
pub mod dead_letter;
pub mod dedupe;
pub mod demo;
pub mod deploy;
pub mod effects;
pub mod host;
pub mod manifest;
pub mod outcome;
pub mod pipeline;
pub mod receive;
pub mod registry;
pub mod relay;
pub mod retry;
pub mod runtime;
pub mod server;
pub mod store;
pub mod watch;

pub use host::{Backend, Host, HostOptions};
pub use manifest::Manifest;
pub use outcome::{DaprStatus, Outcome};
pub use pipeline::EventReport;
