//! `infinite-loop`: never returns. The host's CPU-time limit (an epoch
//! deadline) must interrupt it.

wit_bindgen::generate!({ world: "handler", path: "../../wit" });

struct InfiniteLoop;

impl Guest for InfiniteLoop {
    fn handle(event: Event) -> Disposition {
        let mut spins: u64 = 0;
        loop {
            // black_box keeps the optimiser from proving the loop pointless.
            spins = std::hint::black_box(spins.wrapping_add(event.attempt as u64));
        }
    }
}

export!(InfiniteLoop);
