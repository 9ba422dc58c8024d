//! `flaky`: asks the host to retry until a given attempt, then succeeds.
//!
//! The attempt comes from the payload's `succeed_on_attempt` (default 3). On
//! success it records the attempt under `flaky:{event id}`, so a test can see
//! that the effect happened once, and on which attempt.

wit_bindgen::generate!({ world: "handler", path: "../../wit" });

use wasmsub::handler::state;

const DEFAULT_SUCCEED_ON_ATTEMPT: u64 = 3;

struct Flaky;

impl Guest for Flaky {
    fn handle(event: Event) -> Disposition {
        let succeed_on = serde_json::from_slice::<serde_json::Value>(&event.data)
            .ok()
            .and_then(|v| v.get("succeed_on_attempt").and_then(|n| n.as_u64()))
            .unwrap_or(DEFAULT_SUCCEED_ON_ATTEMPT);
        // Written on every attempt: only the successful attempt's write may
        // survive, which is what the host's effect buffering promises.
        let key = format!("flaky:{}", event.id);
        if let Err(why) = state::set(&key, event.attempt.to_string().as_bytes()) {
            return Disposition::Retry(format!("state set {key}: {why}"));
        }
        if u64::from(event.attempt) < succeed_on {
            return Disposition::Retry(format!(
                "flaky: attempt {} of the {succeed_on} needed",
                event.attempt
            ));
        }
        Disposition::Success
    }
}

export!(Flaky);
