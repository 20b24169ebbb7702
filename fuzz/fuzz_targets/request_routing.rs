//! Route matching and sharding-key extraction on arbitrary requests.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardgate::fuzz::request_routing(data));
