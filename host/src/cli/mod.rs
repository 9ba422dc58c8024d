//! What the `wasmsub` command does besides running a host: the HTTP client
//! for a running host ([`client`]), the todo demo ([`demo`]), one event
//! through one handler without a host ([`invoke`]) and new handler projects
//! ([`new`]).

pub mod client;
pub mod demo;
pub mod invoke;
pub mod new;
