//! A bulk delivery's body.
#![no_main]
libfuzzer_sys::fuzz_target!(|body: &[u8]| wasmsub::fuzzing::bulk_request(body));
