//! `wrong-world`: a valid component that does not target the handler world.
//! The host must refuse it at load time with an error naming the file.

wit_bindgen::generate!({ world: "not-a-handler", path: "wit" });

struct WrongWorld;

impl Guest for WrongWorld {
    fn greet(name: String) -> String {
        format!("hello, {name}")
    }
}

export!(WrongWorld);
