//! `self-publisher`: for every event, publishes 64 messages of 1 KiB back to
//! the topic the event came from. Left alone it feeds itself without end
//! (each event makes 64 more); the host's per-tenant flow quotas must keep
//! it from taking the host over.

wit_bindgen::generate!({ world: "handler", path: "../../wit" });

use wasmsub::handler::publisher;

struct SelfPublisher;

impl Guest for SelfPublisher {
    fn handle(event: Event) -> Disposition {
        let payload = format!("{{\"from\":\"{}\",\"padding\":\"{}\"}}", event.id, "x".repeat(1000));
        for _ in 0..64 {
            if let Err(why) = publisher::publish(&event.topic, payload.as_bytes(), "application/json") {
                return Disposition::Retry(format!("publish to {}: {why}", event.topic));
            }
        }
        Disposition::Success
    }
}

export!(SelfPublisher);
