//! Route matching and sharding-key extraction on arbitrary requests.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardgate::dev::fuzz::request_routing(data));
