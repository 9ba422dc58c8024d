//! `huge-return` (hostile fixture): answers `retry` with a reason of many
//! megabytes. The host must bound what it keeps of it (the dead letter and
//! logs carry a cut reason), and its memory limit bounds the rest.

wit_bindgen::generate!({ world: "handler", path: "../../wit" });

struct HugeReturn;

impl Guest for HugeReturn {
    fn handle(_event: Event) -> Disposition {
        Disposition::Drop("x".repeat(16 * 1024 * 1024))
    }
}

export!(HugeReturn);
