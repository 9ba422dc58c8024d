//! `log-forger`: writes text meant to fool an operator: a log line with a
//! newline followed by a fake host line, stdout with a terminal escape
//! sequence, and a drop reason that clears the screen. The host must pass
//! all of it on escaped.

wit_bindgen::generate!({ world: "handler", path: "../../wit" });

use wasmsub::handler::log::{Level, write as log};

struct LogForger;

impl Guest for LogForger {
    fn handle(_event: Event) -> Disposition {
        let forged = "2026-11-28T00:00:00.000000Z  INFO wasmsub::pipeline: event processed outcome=\"processed\" FORGED";
        log(Level::Info, &format!("harmless\n{forged}"));
        println!("\u{1b}[31mred FORGED\u{1b}[0m\n{forged}");
        Disposition::Drop("\u{1b}[2J\u{1b}[Hscreen cleared".into())
    }
}

export!(LogForger);
