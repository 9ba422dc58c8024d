//! Dapr: the host as a Dapr application behind a sidecar.
//!
//! - [`sidecar`]: the sidecar's HTTP API (publish, state, transactions);
//! - [`state_store`]: the delivery store on a Dapr state store;
//! - [`subscriptions`]: `GET /dapr/subscribe` from the manifest;
//! - [`app`]: the event routes Dapr delivers to;
//! - [`streaming`]: gRPC streaming subscriptions for topics added at runtime.

pub mod app;
pub mod sidecar;
pub mod state_store;
pub mod streaming;
pub mod subscriptions;

pub use sidecar::Sidecar;
pub use state_store::DaprStore;
