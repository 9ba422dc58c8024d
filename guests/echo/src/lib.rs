//! `echo`: the benchmark baseline. Parses the payload as JSON (the least work
//! a real handler does) and succeeds, with no state or publish.

wit_bindgen::generate!({ world: "handler", path: "../../wit" });

struct Echo;

impl Guest for Echo {
    fn handle(event: Event) -> Disposition {
        match serde_json::from_slice::<serde_json::Value>(&event.data) {
            Ok(_) => Disposition::Success,
            Err(e) => Disposition::Drop(format!("payload is not JSON: {e}")),
        }
    }
}

export!(Echo);
