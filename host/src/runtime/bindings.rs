//! The host side of the WIT contract: the one `bindgen!` of the host.
//! Everything else imports the generated types through the re-exports below.
//! (The generated items are documented in `wit/handler.wit`.)
#![allow(missing_docs)]

wasmtime::component::bindgen!({
    world: "handler",
    path: "../wit",
});

pub use wasmsub::handler::log::Level as GuestLogLevel;
pub(crate) use wasmsub::handler::{log, publisher, state, types};

/// The world every handler must target, for error messages.
pub const HANDLER_WORLD: &str = "wasmsub:handler/handler@0.1.0";
