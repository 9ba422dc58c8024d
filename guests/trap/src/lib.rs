//! `trap`: writes state, then panics half-way through the attempt. With
//! `panic = "abort"` the panic is a wasm trap: the host must contain it,
//! discard the write and retry, then dead-letter.

wit_bindgen::generate!({ world: "handler", path: "../../wit" });

use wasmsub::handler::state;

struct Trap;

impl Guest for Trap {
    fn handle(event: Event) -> Disposition {
        let key = format!("trap:{}", event.id);
        if let Err(why) = state::set(&key, b"half-written") {
            return Disposition::Retry(format!("state set {key}: {why}"));
        }
        panic!("trap: giving up half-way through event {}", event.id);
    }
}

export!(Trap);
