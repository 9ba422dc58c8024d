//! A delivery's bytes, with and without a CloudEvents content type.
#![no_main]
libfuzzer_sys::fuzz_target!(|input: (bool, &[u8])| {
    let (structured, body) = input;
    let content_type = structured.then_some("application/cloudevents+json");
    wasmsub::fuzzing::cloud_event(body, content_type);
});
