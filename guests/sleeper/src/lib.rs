//! `sleeper`: sleeps (a WASI clock wait, not a busy loop) for the payload's
//! `sleep_ms`, default a minute, then succeeds. Sleeping uses no CPU, so only
//! the host's wall-clock limit can stop it.

wit_bindgen::generate!({ world: "handler", path: "../../wit" });

struct Sleeper;

impl Guest for Sleeper {
    fn handle(event: Event) -> Disposition {
        let text = String::from_utf8_lossy(&event.data);
        let sleep_ms = text
            .split("\"sleep_ms\":")
            .nth(1)
            .and_then(|rest| rest.trim().split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|digits| digits.parse().ok())
            .unwrap_or(60_000);
        std::thread::sleep(std::time::Duration::from_millis(sleep_ms));
        Disposition::Success
    }
}

export!(Sleeper);
