//! Transports: the ways events reach the host. Each is a leaf: it receives,
//! turns what it received into a [`crate::delivery::Delivery`], hands it to
//! the [`crate::delivery::Door`], and answers with the door's status.
//!
//! - [`dapr_app`]: the HTTP routes a Dapr sidecar delivers to (single and
//!   bulk), and `GET /dapr/subscribe` ([`dapr_subscriptions`]);
//!   [`bulk_sizing`] tells the operator when Dapr holds bulk requests back;
//! - [`dapr_streaming`]: gRPC streaming subscriptions for topics handlers
//!   added at runtime need;
//! - [`embedded`]: the in-process broker (a queue the dispatcher drains)
//!   and its publish API ([`publish_api`]).

mod bulk_sizing;
pub(crate) mod dapr_app;
pub(crate) mod dapr_streaming;
mod dapr_subscriptions;
pub(crate) mod embedded;
pub(crate) mod publish_api;

pub use dapr_subscriptions::{BulkSubscribe, Routes, Rule, Subscription};
pub use embedded::PublishError;
