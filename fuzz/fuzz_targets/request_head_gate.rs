//! The request-head gate (the one hand-written HTTP/1.1 parser) on arbitrary client streams,
//! cut at arbitrary places.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardgate::dev::fuzz::request_head_gate(data));
