//! The host side of the WIT contract: the one `bindgen!` of the host.
//! Everything else imports the generated types through the re-exports below.
//! (The generated items are documented in `wit/handler.wit`.)
#![allow(missing_docs)]

wasmtime::component::bindgen!({
    world: "handler",
    path: "../wit",
    // Async on both sides: a state read awaits the store instead of
    // blocking, and an attempt is a future the host can cut off at its
    // wall-clock limit wherever the guest is (computing or blocked in WASI).
    imports: { default: async },
    exports: { default: async },
});

pub use wasmsub::handler::log::Level as GuestLogLevel;
pub(crate) use wasmsub::handler::{log, publisher, state, types};

/// The world every handler must target, for error messages.
pub const HANDLER_WORLD: &str = "wasmsub:handler/handler@0.1.0";
