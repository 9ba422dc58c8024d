//! wasmsub: sandboxed, hot-swappable WebAssembly event handlers next to Dapr.
//!
//! An event's path through the host, one module per stage:
//!
//! - [`transport`]: how events arrive (Dapr's app routes, single and bulk;
//!   Dapr streaming subscriptions; the embedded broker's queue). Each turns
//!   what it received into a [`Delivery`];
//! - [`delivery`]: the one door every delivery comes through: parse once,
//!   route (rules, fan-out), combine the answers;
//! - [`pipeline`]: one event and one handler, stage by stage: `receive` →
//!   `dedupe` (claim) → `dispatch` (one attempt on a fresh instance) →
//!   `retry` → `commit` → `outcome` or `dead_letter`;
//! - [`runtime`]: the WebAssembly side (wasmtime, the WIT bindings, limits);
//! - [`store`]: claims with leases, tenant state, the outbox and the
//!   embedded queue, committed together;
//! - [`outbox`]: where committed messages go, and the relay that retries them.
//!
//! Around it: [`control`] (handlers, versions, deploys), [`manifest`] (the
//! `wasmsub.toml` file), [`metrics`] (Prometheus), [`telemetry`] (OpenTelemetry traces), [`server`] (HTTP), [`host`] (assembly), [`clock`]
//! (the time seam tests control), [`sidecar`] (Dapr's HTTP API), [`text`]
//! (escaping what others wrote) and [`cli`] (the command's client, demo and
//! `invoke`).
#![deny(missing_docs)]

mod budget;
pub mod cli;
pub mod clock;
pub mod cloudevent;
pub mod control;
mod delivery;
mod faults;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod host;
pub mod manifest;
pub mod metrics;
mod outbox;
pub mod pipeline;
pub mod runtime;
mod server;
pub mod sidecar;
pub mod store;
pub mod telemetry;
pub mod text;
pub mod transport;

pub use budget::MemoryBudget;
pub use delivery::{Delivery, Destination, Door};
pub use host::{Backend, Host, HostOptions, check, run};
pub use manifest::Manifest;
pub use outbox::Publisher;
pub use pipeline::{DaprStatus, DuplicateOf, EventReport, Outcome};
pub use server::serve;
