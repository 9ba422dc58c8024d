//! A queue row as read back from the embedded store's file.
#![no_main]
libfuzzer_sys::fuzz_target!(|row: &[u8]| wasmsub::fuzzing::queue_row(row));
