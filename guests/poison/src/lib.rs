//! `poison`: fails every attempt with a retryable error, so the host retries
//! it to the end of its budget and then dead-letters it with this reason.

wit_bindgen::generate!({ world: "handler", path: "../../wit" });

struct Poison;

impl Guest for Poison {
    fn handle(event: Event) -> Disposition {
        Disposition::Retry(format!("poison: event {} can never be handled", event.id))
    }
}

export!(Poison);
