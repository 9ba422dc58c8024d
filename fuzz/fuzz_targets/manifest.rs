//! A manifest's text.
#![no_main]
libfuzzer_sys::fuzz_target!(|text: &str| wasmsub::fuzzing::manifest(text));
