//! `deep-recursion` (hostile fixture): recurses without end. The wasm stack
//! limit must stop it as a stack overflow, not crash the host.

wit_bindgen::generate!({ world: "handler", path: "../../wit" });

struct DeepRecursion;

#[inline(never)]
fn descend(depth: u64, trail: &mut [u64; 16]) -> u64 {
    trail[(depth % 16) as usize] = depth;
    let mut next = *trail;
    // The work after the call keeps it from becoming a loop.
    descend(std::hint::black_box(depth + 1), &mut next) + next[0]
}

impl Guest for DeepRecursion {
    fn handle(_event: Event) -> Disposition {
        let mut trail = [0u64; 16];
        let total = descend(0, &mut trail);
        Disposition::Retry(format!("unreachable: {total}"))
    }
}

export!(DeepRecursion);
