//! Injected faults for the integration tests: a pause at a named point of
//! the commit path, to put a run past its lease where a real stall (a
//! frozen sidecar, a paused VM) would. Compiled only with the
//! `fault-injection` feature, which the tests' host binary enables and the
//! service build never does.
//!
//! `WASMSUB_FAULT_PAUSE=<point>:<milliseconds>:<text>` pauses every pass
//! through `<point>` whose subject (an event's dedupe key) contains `<text>`
//! (e.g. `before-commit:15000:stale-1`).

/// Pauses here if the environment asks for a pause at `point` for `subject`.
#[cfg(feature = "fault-injection")]
pub async fn pause(point: &str, subject: &str) {
    use std::sync::OnceLock;
    static PAUSE: OnceLock<Option<(String, u64, String)>> = OnceLock::new();
    let configured = PAUSE.get_or_init(|| {
        let value = std::env::var("WASMSUB_FAULT_PAUSE").ok()?;
        let mut parts = value.splitn(3, ':');
        let (name, ms, text) = (parts.next()?, parts.next()?, parts.next().unwrap_or(""));
        Some((name.to_owned(), ms.parse().ok()?, text.to_owned()))
    });
    if let Some((name, ms, text)) = configured
        && name == point
        && subject.contains(text.as_str())
    {
        tracing::warn!(point, ms, subject, "injected fault: pausing");
        tokio::time::sleep(std::time::Duration::from_millis(*ms)).await;
    }
}

/// Without the `fault-injection` feature, nothing.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub async fn pause(_point: &str, _subject: &str) {}
