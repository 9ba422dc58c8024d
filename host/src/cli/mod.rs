//! What the `wasmsub` command does besides running a host: the HTTP client
//! for a running host ([`client`]) and the todo demo ([`demo`]).

pub mod client;
pub mod demo;
