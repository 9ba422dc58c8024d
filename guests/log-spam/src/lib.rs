//! `log-spam` (hostile fixture): writes 100,000 log lines of 1 KiB and then
//! succeeds. The host must keep only its per-attempt log budget and count
//! the rest as dropped.

wit_bindgen::generate!({ world: "handler", path: "../../wit" });

use wasmsub::handler::log::{Level, write};

struct LogSpam;

impl Guest for LogSpam {
    fn handle(_event: Event) -> Disposition {
        let line = "spam ".repeat(205);
        for _ in 0..100_000 {
            write(Level::Info, &line);
        }
        Disposition::Success
    }
}

export!(LogSpam);
