//! `key-prober` (hostile fixture): tries to read and write other tenants'
//! state through crafted keys (separators, `..`, prefixes of the host's own
//! key layout, NUL, empty, huge). It records what each read returned under
//! `probe:{n}` in its own state, then succeeds, so a test can check that no
//! read saw another tenant's data and no write landed outside the tenant.

wit_bindgen::generate!({ world: "handler", path: "../../wit" });

use wasmsub::handler::state;

/// Keys a guest might hope to escape its namespace with.
pub const PROBES: &[&str] = &[
    "secret",
    "../victim/secret",
    "victim/secret",
    "victim|secret",
    "wasmsub|state|6:victim|secret",
    "6:victim|secret",
    "||secret",
    "victim||secret",
    "%2e%2e/victim/secret",
    "victim\u{0}secret",
    "",
];

struct KeyProber;

impl Guest for KeyProber {
    fn handle(_event: Event) -> Disposition {
        let huge = "k".repeat(100_000);
        let mut probes: Vec<&str> = PROBES.to_vec();
        probes.push(&huge);
        for (n, key) in probes.iter().enumerate() {
            let seen = match state::get(key) {
                Ok(Some(value)) => format!("read:{}", String::from_utf8_lossy(&value)),
                Ok(None) => "absent".to_owned(),
                Err(why) => format!("refused:{why}"),
            };
            let wrote = match state::set(key, b"written by the prober") {
                Ok(()) => "wrote",
                Err(_) => "write-refused",
            };
            if let Err(why) = state::set(&format!("probe:{n}"), format!("{seen}|{wrote}").as_bytes()) {
                return Disposition::Retry(format!("recording probe {n}: {why}"));
            }
        }
        Disposition::Success
    }
}

export!(KeyProber);
