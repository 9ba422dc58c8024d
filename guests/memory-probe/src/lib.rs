//! `memory-probe`: says whether its instance has handled an event before.
//!
//! It keeps what it saw in its own memory (a static counter and a heap
//! buffer it fills) and stores, for each event, `seen:{event id}` = how
//! many events this instance had handled before it, and what it found in
//! the buffer. A host that gives every event a fresh instance (made when
//! the event comes or ahead of it) always stores `0 0`; a reused instance
//! shows as a higher count.

wit_bindgen::generate!({ world: "handler", path: "../../wit" });

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use wasmsub::handler::state;

static HANDLED: AtomicU64 = AtomicU64::new(0);
static LEFT_BEHIND: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct MemoryProbe;

impl Guest for MemoryProbe {
    fn handle(event: Event) -> Disposition {
        let before = HANDLED.fetch_add(1, Ordering::SeqCst);
        let mut left = LEFT_BEHIND.lock().unwrap_or_else(|p| p.into_inner());
        let found = left.len();
        // Something for the next event on this instance to find.
        left.extend_from_slice(&[0xAB; 4096]);
        let key = format!("seen:{}", event.id);
        match state::set(&key, format!("{before} {found}").as_bytes()) {
            Ok(()) => Disposition::Success,
            Err(why) => Disposition::Retry(format!("state set {key}: {why}")),
        }
    }
}

export!(MemoryProbe);
