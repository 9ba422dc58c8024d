//! Write a wasmsub handler in Rust.
//!
//! A handler is a function from an [`Event`] and a [`Host`] to a
//! [`Disposition`]; [`handler!`] exports it as the component's `handle`.
//! Everything the handler does goes through the `Host` it is given, so the
//! same function runs against the real host in the component and against
//! [`testing::TestHost`], an in-memory double, in a native `cargo test`
//! (calling the WIT imports directly outside a component aborts).
//!
//! ```ignore
//! use wasmsub_guest::{Disposition, Event, Host};
//!
//! fn handle(event: &Event, host: &mut impl Host) -> Disposition {
//!     let Ok(task) = event.json::<serde_json::Value>() else {
//!         return Disposition::Drop("not JSON".into());
//!     };
//!     if let Err(why) = host.set_json("last", &task) {
//!         return Disposition::Retry(why);
//!     }
//!     Disposition::Success
//! }
//!
//! wasmsub_guest::handler!(handle);
//! ```

// The bindings name this crate by its path, as the handler crates see it.
extern crate self as wasmsub_guest;

pub mod testing;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The WIT bindings of the `handler` world (`wit/handler.wit`).
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "handler",
        path: "wit",
        pub_export_macro: true,
        export_macro_name: "export_handler_world",
        default_bindings_module: "::wasmsub_guest::bindings",
        runtime_path: "::wasmsub_guest::__wit_bindgen::rt",
    });
}

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

pub use bindings::wasmsub::handler::log::Level;
pub use bindings::wasmsub::handler::types::{Disposition, Event};

/// What a handler may ask of the host: the tenant's state, follow-up
/// publishes and logs. Writes and publishes are buffered by the host and
/// applied only if the handler answers [`Disposition::Success`].
pub trait Host {
    /// The value stored under `key`, if any (this attempt's own writes
    /// included). `Err` is the host's reason for refusing.
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, String>;
    /// Stores `value` under `key`.
    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), String>;
    /// Removes `key`.
    fn delete(&mut self, key: &str) -> Result<(), String>;
    /// Queues `data` for `topic`.
    fn publish(&mut self, topic: &str, data: &[u8], content_type: &str) -> Result<(), String>;
    /// Writes a log line into the host's logs.
    fn log(&mut self, level: Level, message: &str);

    /// The JSON value under `key`, if any.
    fn get_json<T: DeserializeOwned>(&mut self, key: &str) -> Result<Option<T>, String> {
        match self.get(key)? {
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| format!("state `{key}` is not the JSON expected: {e}")),
            None => Ok(None),
        }
    }

    /// Stores `value` as JSON under `key`.
    fn set_json<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) -> Result<(), String> {
        let bytes = serde_json::to_vec(value).map_err(|e| format!("cannot encode state `{key}`: {e}"))?;
        self.set(key, &bytes)
    }

    /// Queues `value` as an `application/json` event for `topic`.
    fn publish_json<T: Serialize + ?Sized>(&mut self, topic: &str, value: &T) -> Result<(), String> {
        let bytes = serde_json::to_vec(value).map_err(|e| format!("cannot encode the event for `{topic}`: {e}"))?;
        self.publish(topic, &bytes, "application/json")
    }

    /// An info line.
    fn info(&mut self, message: &str) {
        self.log(Level::Info, message);
    }
}

impl Event {
    /// The payload parsed as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_slice(&self.data).map_err(|e| format!("the event's data is not the JSON expected: {e}"))
    }

    /// An extension attribute (`traceparent`, ...), if the event has it.
    pub fn extension(&self, name: &str) -> Option<&str> {
        self.extensions.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }
}

/// The host the component runs in: each call is the WIT import.
pub struct Wasmsub;

impl Host for Wasmsub {
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, String> {
        bindings::wasmsub::handler::state::get(key)
    }
    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), String> {
        bindings::wasmsub::handler::state::set(key, value)
    }
    fn delete(&mut self, key: &str) -> Result<(), String> {
        bindings::wasmsub::handler::state::delete(key)
    }
    fn publish(&mut self, topic: &str, data: &[u8], content_type: &str) -> Result<(), String> {
        bindings::wasmsub::handler::publisher::publish(topic, data, content_type)
    }
    fn log(&mut self, level: Level, message: &str) {
        bindings::wasmsub::handler::log::write(level, message);
    }
}

/// Exports `$handle` (a `fn(&Event, &mut impl Host) -> Disposition`, or
/// one taking `&mut Wasmsub`) as the component's `handle`.
#[macro_export]
macro_rules! handler {
    ($handle:path) => {
        #[doc(hidden)]
        pub struct __WasmsubHandler;

        impl $crate::bindings::Guest for __WasmsubHandler {
            fn handle(event: $crate::Event) -> $crate::Disposition {
                $handle(&event, &mut $crate::Wasmsub)
            }
        }

        $crate::bindings::export_handler_world!(__WasmsubHandler with_types_in $crate::bindings);
    };
}
