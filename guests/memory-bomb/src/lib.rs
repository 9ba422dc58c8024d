//! `memory-bomb` (hostile fixture): allocates 1 MiB blocks and keeps them
//! until the allocator is refused. The host's memory limit must stop it with
//! a reason that names the limit.

wit_bindgen::generate!({ world: "handler", path: "../../wit" });

struct MemoryBomb;

impl Guest for MemoryBomb {
    fn handle(_event: Event) -> Disposition {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            // Touch every block so no page stays lazily unmapped.
            hoard.push(vec![0xA5; 1024 * 1024]);
            std::hint::black_box(&hoard);
        }
    }
}

export!(MemoryBomb);
