//! What a guest hands back: a state key and value, a topic, a content type,
//! a retry or drop reason.
#![no_main]
libfuzzer_sys::fuzz_target!(|input: (&str, &[u8], &str, &str, &str)| {
    let (key, value, topic, content_type, reason) = input;
    wasmsub::fuzzing::guest_values(key, value, topic, content_type, reason);
});
