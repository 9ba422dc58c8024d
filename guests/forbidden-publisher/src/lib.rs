//! `forbidden-publisher` (hostile fixture): publishes to a topic outside its
//! tenant's allowlist. The host refuses with a reason the guest sees; the
//! guest hands that reason back as a `drop`, so a test can read it.

wit_bindgen::generate!({ world: "handler", path: "../../wit" });

use wasmsub::handler::publisher;

struct ForbiddenPublisher;

impl Guest for ForbiddenPublisher {
    fn handle(_event: Event) -> Disposition {
        match publisher::publish("payments", b"{\"steal\": true}", "application/json") {
            Ok(()) => Disposition::Success,
            Err(why) => Disposition::Drop(format!("publish refused: {why}")),
        }
    }
}

export!(ForbiddenPublisher);
