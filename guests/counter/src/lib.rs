//! `counter`: adds one to the tenant's shared `total` (read, then write the
//! read value plus one). Run concurrently, it loses updates unless the host
//! validates reads at commit; a test counts that `total` ends equal to the
//! number of events.

wit_bindgen::generate!({ world: "handler", path: "../../wit" });

use wasmsub::handler::state;

struct Counter;

impl Guest for Counter {
    fn handle(_event: Event) -> Disposition {
        let total = match state::get("total") {
            Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).parse::<u64>().unwrap_or(0),
            Ok(None) => 0,
            Err(why) => return Disposition::Retry(format!("state get total: {why}")),
        };
        match state::set("total", (total + 1).to_string().as_bytes()) {
            Ok(()) => Disposition::Success,
            Err(why) => Disposition::Retry(format!("state set total: {why}")),
        }
    }
}

export!(Counter);
